//! The bottom floor: cryptographic primitives and verifiers that know nothing of HTTP,
//! queues or the database.

pub mod blind_index;
pub mod jwt;
pub mod keyring;
pub mod password;
pub mod twilio;
