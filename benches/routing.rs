//! Per-request cost that could grow with the number of services (issue 12,
//! item 3): routing a real `http::Request` by its Host header, and counting
//! its answer under the service's label, at 10 and at 500 services.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Request;
use sdgate::observe::metrics::Metrics;
use sdgate::proxy::router::Router;

const SIZES: [usize; 2] = [10, 500];

fn host(index: usize) -> String {
    format!("svc-{index:03}.bench.local")
}

fn request(host: &str) -> Request<()> {
    Request::post("/sdapi/v1/txt2img").header("host", host).body(()).expect("request")
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for services in SIZES {
        let hosts: Vec<Vec<String>> = (0..services).map(|i| vec![host(i)]).collect();
        let router = Router::new(hosts.iter().map(Vec::as_slice));
        let last = services - 1;
        let cases = [
            ("first service", request(&host(0)), Some(0)),
            ("last service", request(&host(last)), Some(last)),
            // Upper case and a port: the slow path (lower-cased copy).
            (
                "last service, Host with case and port",
                request(&format!("{}:8080", host(last).to_uppercase())),
                Some(last),
            ),
            ("unknown host (404)", request("nowhere.bench.local"), None),
        ];
        for (name, request, expected) in cases {
            assert_eq!(router.route(&request).ok(), expected, "{name}");
            group.bench_with_input(BenchmarkId::new(name, services), &request, |b, request| {
                b.iter(|| black_box(router.route(black_box(request)).ok()))
            });
        }
    }
    group.finish();
}

/// The per-request metrics of the last service: a 200 (resolved once) and a
/// 503 (looked up by label).
fn metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("answer metrics");
    for services in SIZES {
        let metrics = Metrics::new();
        let all: Vec<_> = (0..services).map(|i| metrics.service(&host(i))).collect();
        let last = &all[services - 1];
        for code in [200u16, 503] {
            last.answered(code);
            group.bench_with_input(BenchmarkId::new(format!("answered({code})"), services), &code, |b, code| {
                b.iter(|| last.answered(black_box(*code)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, routing, metrics);
criterion_main!(benches);
