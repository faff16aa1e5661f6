//! The data a plugin's wasmtime `Store` carries: the sandboxed WASI context, the limits, and
//! the capabilities of the invocation under way.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::capability::{Invocation, PluginContext};

/// Bytes of a plugin's stderr kept to explain a trap (a Rust panic message lands there).
const STDERR_CAPTURE: usize = 16 * 1024;

/// Per-store state of one plugin instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) stderr: MemoryOutputPipe,
    /// When the current invocation must have finished.
    pub(crate) deadline: Instant,
    pub(crate) plugin: Arc<PluginContext>,
    /// The invocation under way; `None` between events.
    pub(crate) invocation: Option<Invocation>,
}

impl HostState {
    pub(crate) fn new(plugin: Arc<PluginContext>, limits: StoreLimits) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        // No preopened directories, no environment, no arguments, no stdin, no sockets: the
        // builder grants none of these unless asked. Clocks and randomness stay available.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limits,
            stderr,
            deadline: Instant::now(),
            plugin,
            invocation: None,
        }
    }

    /// The last line the plugin wrote to stderr, if any (e.g. its panic message).
    pub(crate) fn last_stderr_line(&self) -> Option<String> {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        text.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl crate::runtime::bindings::switchyard::plugin::types::Host for HostState {}
