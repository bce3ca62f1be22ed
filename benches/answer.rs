//! What reading a generation's answer costs sdgate when the WebUI gzips it
//! (it does for every client that accepts gzip: Python's `requests`, so
//! `webuiapi`): inflating it to read its tail (what sdgate does), against
//! reading a plain answer, and against the other way to learn what it ran
//! on, asking the pod for identity and compressing at sdgate for the client.
//!
//! The answer is shaped like an SDXL one: a 1024x1024 PNG in base64 (about
//! 1.5 MB of incompressible image data, as base64 text) with its `info`
//! string at the end, gzipped as starlette's GZipMiddleware does (level 9).
//!
//! Run with `cargo bench --bench answer` (about half a minute on two cores).

use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sdgate::answer::{gunzip_tail, held_in};

/// A WebUI txt2img answer with `image_bytes` of image (before base64).
fn answer(image_bytes: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let image: Vec<u8> = (0..image_bytes)
        .map(|_| {
            // xorshift: a PNG's deflated pixels look random to gzip.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let base64: String = image
        .chunks(3)
        .flat_map(|group| {
            let n = group.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            (0..4).map(move |i| char::from(alphabet[(n >> (18 - 6 * i) & 63) as usize]))
        })
        .collect();
    format!(
        r#"{{"images":["{base64}"],"parameters":{{"prompt":"pretty dog","steps":20}},"info":"{{\"prompt\": \"pretty dog\", \"sd_model_name\": \"sd_xl_base_1.0\", \"sd_model_hash\": \"31e35c80fc\"}}"}}"#
    )
    .into_bytes()
}

fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    encoder.write_all(bytes).expect("in memory");
    encoder.finish().expect("in memory")
}

fn reading_answers(c: &mut Criterion) {
    let plain = answer(1_100_000);
    let gzipped = gzip(&plain, 9);
    assert_eq!(gunzip_tail(&gzipped).as_deref().and_then(held_in), Some("sd_xl_base_1.0"));
    let mut group = c.benchmark_group("answer");
    group.throughput(Throughput::Bytes(plain.len() as u64));
    group.sample_size(20);
    group.bench_function("read a plain answer's checkpoint", |b| b.iter(|| held_in(black_box(&plain)).map(str::len)));
    group.bench_function("inflate a gzipped answer and read its checkpoint (sdgate)", |b| {
        b.iter(|| gunzip_tail(black_box(&gzipped)).as_deref().and_then(held_in).map(str::len))
    });
    for level in [1, 6] {
        group.bench_function(format!("gzip a plain answer at level {level} (compressing at sdgate instead)"), |b| {
            b.iter(|| gzip(black_box(&plain), level).len())
        });
    }
    group.finish();
}

criterion_group!(benches, reading_answers);
criterion_main!(benches);
