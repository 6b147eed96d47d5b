//! The bottom floor: cryptographic primitives, verifiers and the outbound address policy
//! (`net`), knowing nothing of HTTP, queues or the database.

pub mod blind_index;
pub mod jwt;
pub mod keyring;
pub mod net;
pub mod password;
pub mod twilio;
