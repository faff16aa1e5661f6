//! The data a plugin's wasmtime `Store` carries: the sandboxed WASI context, the limits, and
//! the capabilities of the invocation under way.

use std::sync::Arc;
use std::time::Instant;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::capability::http::Egress;
use crate::capability::{Invocation, PluginContext};

/// Bytes of a plugin's stderr kept to explain a trap (a Rust panic message lands there).
const STDERR_TAIL: usize = 4 * 1024;

/// The last bytes a plugin wrote to stderr. Writes never fail: older bytes are dropped.
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    fn clear(&self) {
        if let Ok(mut tail) = self.0.lock() {
            tail.clear();
        }
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .map(|t| String::from_utf8_lossy(&t.iter().copied().collect::<Vec<u8>>()).into_owned())
            .unwrap_or_default()
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Ok(mut tail) = self.0.lock() {
            tail.extend(buf);
            let excess = tail.len().saturating_sub(STDERR_TAIL);
            tail.drain(..excess);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Per-store state of one plugin instance.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    egress: Egress,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) stderr: StderrTail,
    /// When the current invocation must have finished.
    pub(crate) deadline: Instant,
    pub(crate) plugin: Arc<PluginContext>,
    /// The invocation under way; `None` between events.
    pub(crate) invocation: Option<Invocation>,
}

impl HostState {
    pub(crate) fn new(plugin: Arc<PluginContext>, limits: StoreLimits) -> Self {
        let stderr = StderrTail::default();
        // No preopened directories, no environment, no arguments, no stdin, no sockets: the
        // builder grants none of these unless asked. Clocks and randomness stay available.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let egress = Egress {
            plugin: plugin.name.clone(),
            allowed: plugin.allowed_hosts.clone(),
            deadline: Instant::now(),
            event_id: String::new(),
        };
        HostState {
            wasi,
            http: WasiHttpCtx::new(),
            egress,
            table: ResourceTable::new(),
            limits,
            stderr,
            deadline: Instant::now(),
            plugin,
            invocation: None,
        }
    }

    /// Forget what the previous invocation wrote to stderr.
    pub(crate) fn clear_stderr(&self) {
        self.stderr.clear();
    }

    /// What the plugin wrote to stderr before trapping: for a Rust panic, the "panicked at"
    /// line and its message.
    pub(crate) fn panic_message(&self) -> Option<String> {
        let text = self.stderr.text();
        let lines: Vec<&str> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("note: ")).collect();
        let start = lines.iter().rposition(|l| l.contains("panicked at")).unwrap_or(lines.len().saturating_sub(1));
        let message = lines.get(start..)?.join(" ");
        (!message.is_empty()).then_some(message)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        // Any wasi:http call, not only a request sent: the invocation is not pure.
        if let Some(invocation) = self.invocation.as_mut() {
            invocation.reached_out = true;
            self.egress.event_id.clone_from(&invocation.event_id);
        }
        self.egress.deadline = self.deadline;
        WasiHttpCtxView { hooks: &mut self.egress, table: &mut self.table, ctx: &mut self.http }
    }
}

impl crate::runtime::bindings::switchyard::plugin::types::Host for HostState {}
