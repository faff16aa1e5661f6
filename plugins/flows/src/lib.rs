//! What the seed flows' plugins share. Each payload type here is the contract between the
//! plugin that publishes an event and the plugins that consume it, so both sides decode the
//! same shape.

pub mod email;
pub mod follows;
pub mod orders;
pub mod users;
