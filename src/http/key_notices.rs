//! The ingress's side of tenant-key change notices (`gatehouse tenants rotate-secret`): a
//! task subscribed to `{ns}:tenant-keys` that drops a tenant's entry from this ingress's
//! [`KeyCache`] when its keys change. Publishing and reading a notice is the core's
//! (`tenant_secrets::notify` / `decode_notice`); only the cache it updates is the edge's.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use secrecy::ExposeSecret;

use super::key_cache::KeyCache;
use crate::redis_conn::RedisTarget;
use crate::tenant_secrets;

/// Listens on the tenant-key channel until aborted: a notice drops that tenant's cached keys;
/// after a (re)connection every entry is marked for a refresh (a notice may have been missed
/// meanwhile). Reconnects with backoff; never gives up. On a Redis Cluster a notice published
/// on any node reaches every node's subscribers, so it subscribes on one seed node, the next
/// one when that one cannot be reached.
pub async fn listen(target: RedisTarget, namespace: String, cache: Arc<KeyCache>) {
    let channel = tenant_secrets::channel(&namespace);
    let mut wait = Duration::from_millis(200);
    let mut connected_before = false;
    let mut attempt = 0usize;
    loop {
        let nodes = target.nodes();
        let Some(url) = nodes.get(attempt % nodes.len().max(1)) else {
            return;
        };
        attempt = attempt.wrapping_add(1);
        let subscribed = async {
            let client = redis::Client::open(url.expose_secret())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(mut pubsub) => {
                wait = Duration::from_millis(200);
                if connected_before {
                    cache.mark_all_stale().await;
                }
                connected_before = true;
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let tenant = message
                        .get_payload::<String>()
                        .ok()
                        .and_then(|p| tenant_secrets::decode_notice(&p));
                    if let Some(tenant) = tenant {
                        cache.invalidate(tenant).await;
                        tracing::info!(tenant.id = %tenant, "tenant keys changed; cached keys dropped");
                    }
                }
                tracing::debug!("tenant-key notices: subscription ended; reconnecting");
            }
            Err(error) => {
                tracing::debug!(%error, "tenant-key notices: cannot subscribe; retrying");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}
