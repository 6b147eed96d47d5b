//! Every Lua script of the consuming side, loaded once (`LazyLock<Script>`), in one place.
//! The scripts live in `src/queue/lua/`; their `KEYS` are the methods of
//! [`QueueKeys`](super::keys::QueueKeys). The enqueue script belongs to the contract crate
//! (`jobs/lua/enqueue.lua`, run by `gatehouse_jobs::client`).

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($(#[$doc:meta])* $name:ident, $file:literal) => {
        $(#[$doc])*
        pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!(concat!("lua/", $file))));
    };
    // A script that moves jobs between waiting and running: `fair.lua` (its shebang, the
    // fairness keys and functions) comes first.
    ($(#[$doc:meta])* fair $name:ident, $file:literal) => {
        $(#[$doc])*
        pub(crate) static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/fair.lua"),
                include_str!(concat!("lua/", $file))
            ))
        });
    };
}

script!(
    /// Admits due retries and arrivals into the fair order, then takes a batch from it into a
    /// worker's inflight hash.
    fair FETCH,
    "fetch.lua"
);
script!(
    /// Records how each job of a batch ended (done, retry, dead, deferred).
    fair ACK,
    "ack.lua"
);
script!(
    /// Keeps workers alive, then recovers the jobs of workers that stopped heartbeating.
    fair HEARTBEAT,
    "heartbeat.lua"
);
script!(
    /// Registers a worker name.
    REGISTER,
    "register.lua"
);
script!(
    /// Gives fetched but unstarted jobs back to the head of the fair order.
    fair RELEASE,
    "release.lua"
);
script!(
    /// Removes a worker name on a clean stop (when it holds nothing).
    DEREGISTER,
    "deregister.lua"
);
script!(
    /// Removes finished jobs past their retention, or the oldest dead jobs, leaving a
    /// tombstone for each live dedupe claim.
    FORGET,
    "forget.lua"
);
script!(
    /// Puts a dead job back on its queue.
    DEAD_RETRY,
    "dead_retry.lua"
);
script!(
    /// One consistent snapshot of a queue's counts.
    STATS,
    "stats.lua"
);
script!(
    /// A key rotation's compare-and-set of re-sealed payloads.
    RESEAL,
    "reseal.lua"
);
