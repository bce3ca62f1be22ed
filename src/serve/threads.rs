//! The threads that serve client connections.
//!
//! Each serving thread runs a single-threaded tokio runtime and has its own
//! pool of connections to the pods. A client connection is handed to one
//! thread (round robin) when accepted and lives there until it closes, so the
//! client-side and pod-side connection tasks of a request wake each other
//! without crossing threads: no work stealing, no futex wake-ups between them
//! (a request that waited in line is woken by whoever freed its pod, possibly
//! from another thread). Measured with `benches/load.sh` (a), this takes about a quarter of
//! the CPU per request away compared with tokio's multi-threaded scheduler.
//! The gate itself is shared by all threads (a short mutex).
//!
//! The control plane (providers, probes, autoscalers, the admin listener)
//! stays on the main runtime.

use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How many serving threads a `threads` setting means (0: one per CPU).
pub fn count(setting: usize) -> usize {
    match setting {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Running serving threads.
pub struct ServingThreads {
    threads: Vec<Thread>,
    next: usize,
}

struct Thread {
    runtime: Handle,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl ServingThreads {
    /// Starts `count` threads (at least one).
    pub fn start(count: usize) -> Result<Self> {
        let mut threads = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let (stop, stopped) = oneshot::channel::<()>();
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            // The runtime is made and dropped on its own thread (a runtime
            // may not be dropped inside another one).
            let join = std::thread::Builder::new()
                .name(format!("sdgate-serve-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(error) => return drop(started.send(Err(error))),
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Tasks still running (connections past the drain
                    // timeout) are dropped: their slots go back to the gate.
                    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                })
                .context("cannot start a serving thread")?;
            let runtime = handle
                .recv()
                .context("a serving thread ended at start")?
                .context("cannot start a serving thread's runtime")?;
            threads.push(Thread { runtime, stop: Some(stop), join: Some(join) });
        }
        Ok(Self { threads, next: 0 })
    }

    /// The runtime of the next thread, round robin.
    pub fn next_runtime(&mut self) -> &Handle {
        let index = self.next % self.threads.len();
        self.next = self.next.wrapping_add(1);
        &self.threads[index].runtime
    }

    /// Stops every thread and waits for them to end.
    pub async fn stop(mut self) {
        let joins: Vec<_> = self
            .threads
            .iter_mut()
            .filter_map(|thread| {
                thread.stop.take();
                thread.join.take()
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for join in joins {
                let _ = join.join();
            }
        })
        .await;
    }
}

impl Drop for ServingThreads {
    fn drop(&mut self) {
        // Dropping the stop senders ends the threads (not joined here).
        for thread in &mut self.threads {
            thread.stop.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_one_thread_per_cpu_and_anything_else_is_taken_as_is() {
        assert!(count(0) >= 1);
        assert_eq!(count(3), 3);
    }

    #[tokio::test]
    async fn connections_go_round_robin_over_the_threads() {
        let mut threads = ServingThreads::start(3).expect("threads");
        let mut seen = Vec::new();
        for _ in 0..6 {
            let name = threads.next_runtime().spawn(async { std::thread::current().name().map(String::from) });
            seen.push(name.await.expect("task ran").expect("a named thread"));
        }
        let names = ["sdgate-serve-0", "sdgate-serve-1", "sdgate-serve-2"];
        assert_eq!(seen, [names, names].concat());
        threads.stop().await;
    }
}
