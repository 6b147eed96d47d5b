//! The per-queue table: each queue's name, what it does, its payload schema, its default retry
//! policy and the names of the variables that override it. The data lives in the contract
//! crate (`gatehouse_jobs::spec`) so the configuration (which reads the variables) and
//! producers can read it too; the queue layer re-exports it here.

pub use gatehouse_jobs::spec::{
    DEFAULT_MAX_ATTEMPTS, QUEUE_SPECS, QueueSpec, RetryDefaults, RetryVariables,
    default_max_attempts, spec,
};
