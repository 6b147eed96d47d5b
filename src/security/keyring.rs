//! The AES-256-GCM envelope and the keyring (current key + decrypt-only old keys).
//!
//! They live in the contract crate, `gatehouse_jobs::envelope`, because producers seal job
//! payloads with the same envelope (SPEC "Customer data in Redis"); this module is their name
//! inside gatehouse, so there is one implementation of the format.

pub use gatehouse_jobs::envelope::*;
