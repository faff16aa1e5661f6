//! switchyard: an event router that hosts WebAssembly handler plugins.
//!
//! # Layout
//! The modules follow the data flow:
//! `source` (RabbitMQ, Redis, in-process bus) → `envelope` (NestJS, CloudEvents, raw JSON →
//! [`event::Event`]) → `route` (event name → subscribed plugins) → `dispatch` (lanes per plugin,
//! per-key order) → `retry` (failed events parked until due, without blocking their lane) →
//! `runtime` (wasmtime components, limits, instances) → `capability` (store,
//! publish, log, config: what a plugin may do) → `commit` (one SQLite transaction per batch of
//! invocations, then ack) → `outbox` (publishes committed events).
//! `config` is `router.toml` as types; `db` is the SQLite schema and reads, and `markers` the
//! filter that spares most processed-marker reads; `admin` is the HTTP API; `telemetry` logs
//! and counts; `plugins` is the live set of plugins the admin API changes and the sources
//! follow; `router` wires it all together; `allocator` is the binaries' memory allocator.

pub mod admin;
pub mod allocator;
pub mod capability;
pub mod commit;
pub mod config;
pub mod db;
pub mod dispatch;
pub mod envelope;
pub mod event;
pub mod markers;
pub mod outbox;
pub mod plugins;
pub mod retry;
pub mod route;
pub mod router;
pub mod runtime;
pub mod source;
pub mod telemetry;
#[cfg(test)]
mod testing;
