//! The idle poll: wakes a worker every interval to look for new jobs.
//!
//! apalis-core 1.0's `IntervalStrategy` replaces its timer after it fires without polling the
//! new one, so the wake-up depends on some other event polling the worker first. In a
//! release build of `gatehouse dev` that did not happen: jobs enqueued into an idle worker
//! waited for its next heartbeat (measured: 1.2 to 4.1 s with a 5 s heartbeat, against
//! 12 to 45 ms with this strategy). This strategy re-arms and polls its timer every time it
//! fires, so a wake-up is always scheduled.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::PollSnapshot;
use apalis::prelude::PollStrategy;
use tokio::time::{Instant, Sleep};

/// Wakes the worker every `interval`.
pub struct Ticker {
    interval: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl Ticker {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            sleep: Box::pin(tokio::time::sleep(interval)),
        }
    }
}

impl Clone for Ticker {
    fn clone(&self) -> Self {
        Self::new(self.interval)
    }
}

impl std::fmt::Debug for Ticker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker")
            .field("interval", &self.interval)
            .finish()
    }
}

impl PollStrategy for Ticker {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut fired = false;
        // Re-arm until the timer is pending, so its waker is always registered.
        while self.sleep.as_mut().poll(cx).is_ready() {
            fired = true;
            let next = Instant::now() + self.interval;
            self.sleep.as_mut().reset(next);
        }
        if fired {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}
