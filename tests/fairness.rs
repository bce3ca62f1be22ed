//! Fair share between the clients of one pool: a client's burst does not
//! make others wait behind all of it; a client may be bounded in how much it
//! queues; batch requests yield to interactive ones.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn from(client: &str, mut request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    request.headers_mut().insert("x-api-key", client.parse().unwrap());
    request
}

const BY_KEY: &str = "    fairness: { key: header, header: X-Api-Key }\n";

/// The prompts in the order the worker ran them.
fn served(worker: &sdgate::tools::sim::SimHandle) -> Vec<String> {
    worker.stats().jobs.into_iter().map(|j| j.prompt).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_client_is_served_next_not_after_a_greedy_clients_burst() {
    let workers = sims(1, fast_sim(10)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, BY_KEY).await;
    let client = client();
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            // 20 steps of 10 ms: the light client arrives while the first
            // runs, however slow the machine (3 steps left it 60 ms).
            tokio::spawn(async move { send(&client, from("greedy", txt2img(addr, &format!("greedy-{i}"), 20))).await })
        })
        .collect();
    gateway.wait_for(|g| g.queue_depth() == 19, "the burst waiting").await;
    assert_eq!(metric(gateway.admin, "sdgate_waiting_clients{service=\"sd\"}").await, Some(1.0));
    let light = send(&client, from("light", txt2img(gateway.addr, "light", 1))).await;
    assert_eq!(light.status, 200);
    for request in burst {
        assert_eq!(request.await.unwrap().status, 200);
    }
    let order = served(&workers[0]);
    let light_at = order.iter().position(|p| p == "light").unwrap();
    assert!(light_at <= 2, "the light client ran {light_at}th of 21: {order:?}");
    assert_no_overlap(&[workers[0].stats()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_max_queued_gets_429_with_retry_after() {
    let workers = sims(1, fast_sim(10)).await;
    let extra = "    fairness: { key: header, header: X-Api-Key, max_queued: 3 }\n";
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, extra).await;
    let client = client();
    let first = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, from("greedy", txt2img(addr, "running", 20))).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "one running").await;
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move { send(&client, from("greedy", txt2img(addr, &format!("w{i}"), 1))).await })
        })
        .collect();
    gateway.wait_for(|g| g.queue_depth() == 3, "three waiting").await;
    let refused = send(&client, from("greedy", txt2img(gateway.addr, "fourth", 1))).await;
    refused.assert_json_error(429);
    assert_eq!(refused.headers["retry-after"], "5");
    // Another client still gets in line.
    let other = send(&client, from("other", txt2img(gateway.addr, "other", 1))).await;
    assert_eq!(other.status, 200);
    assert_eq!(first.await.unwrap().status, 200);
    for request in waiting {
        assert_eq!(request.await.unwrap().status, 200);
    }
    assert!(!served(&workers[0]).contains(&"fourth".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_request_goes_before_a_batch_routes_flood() {
    let workers = sims(1, fast_sim(10)).await;
    let mut yaml = config_yaml(&[workers[0].addr], 1, BY_KEY);
    yaml.push_str("routes:\n  - name: batch\n    hosts: [\"batch.example.com\"]\n    priority: batch\n    split: [{ service: sd, weight: 1 }]\n");
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let client = client();
    let flood: Vec<_> = (0..10)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move {
                let mut request = from(&format!("batch-{i}"), txt2img(addr, &format!("batch-{i}"), 3));
                request.headers_mut().insert("host", "batch.example.com".parse().unwrap());
                send(&client, request).await
            })
        })
        .collect();
    gateway.wait_for(|g| g.queue_depth() == 9, "the batch flood waiting").await;
    assert_eq!(
        metric(gateway.admin, "sdgate_queue_depth_by_priority{priority=\"batch\",service=\"sd\"}").await,
        Some(9.0)
    );
    let user = send(&client, from("user", txt2img(gateway.addr, "user", 1))).await;
    assert_eq!(user.status, 200);
    for request in flood {
        assert_eq!(request.await.unwrap().status, 200);
    }
    let order = served(&workers[0]);
    let user_at = order.iter().position(|p| p == "user").unwrap();
    assert_eq!(user_at, 1, "the user's request ran right after the one in flight: {order:?}");
}
