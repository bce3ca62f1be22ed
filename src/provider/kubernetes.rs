//! Placeholder replaced below.
use crate::config::KubernetesBackend;
use crate::provider::{Context, Provider};

pub struct Kubernetes {
    backend: KubernetesBackend,
}

impl Kubernetes {
    pub fn new(backend: KubernetesBackend) -> Self {
        Self { backend }
    }
}

impl Provider for Kubernetes {
    async fn run(self, mut cx: Context) {
        let _ = &self.backend;
        let _ = (&mut cx.stop).await;
    }
}
