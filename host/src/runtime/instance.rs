//! One instance of a plugin handling events: converts the event to the WIT record, enforces
//! the wall-time and memory limits, and turns the outcome into effects or an [`InvokeError`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use super::bindings::{HandlerError, Plugin, WitEvent, WitHeader};
use super::state::HostState;
use super::{EPOCH_TICK, LoadedPlugin};
use crate::capability::Invocation;
use crate::commit::Effects;
use crate::event::Event;

/// Why an invocation produced no effects.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum InvokeError {
    /// The handler asked to be retried later.
    #[error("handler asked to retry: {0}")]
    Retry(String),
    /// The handler rejected the event for good.
    #[error("handler rejected the event: {0}")]
    Reject(String),
    /// The wall-time limit was reached.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The plugin trapped (a panic, an out-of-bounds access, memory past its cap).
    #[error("plugin trapped: {0}")]
    Trap(String),
}

impl InvokeError {
    /// Whether the instance must be discarded.
    pub fn poisons_instance(&self) -> bool {
        matches!(self, InvokeError::Timeout(_) | InvokeError::Trap(_))
    }
}

pub(super) fn new_store(engine: &Engine, state: HostState, timeout_ms: u64) -> Store<HostState> {
    let mut store = Store::new(engine, state);
    store.data_mut().deadline = Instant::now() + Duration::from_millis(timeout_ms);
    store.limiter(|s| &mut s.limits);
    // Every tick: yield to the executor so a busy plugin never starves other tasks, and trap
    // once the invocation's wall-time deadline has passed.
    store.epoch_deadline_callback(|ctx| {
        if Instant::now() >= ctx.data().deadline { Ok(UpdateDeadline::Interrupt) } else { Ok(UpdateDeadline::Yield(1)) }
    });
    store.set_epoch_deadline(1);
    store
}

/// A live instance of one plugin version.
pub struct Instance {
    plugin: Arc<LoadedPlugin>,
    store: Store<HostState>,
    bindings: Plugin,
    /// Events handled so far.
    pub uses: u64,
}

impl Instance {
    pub async fn new(plugin: Arc<LoadedPlugin>) -> Result<Self, InvokeError> {
        let state = HostState::new(plugin.context.clone(), plugin.store_limits());
        let mut store = new_store(&plugin.engine, state, plugin.settings.limits.timeout_ms);
        let bindings =
            plugin.pre.instantiate_async(&mut store).await.map_err(|e| InvokeError::Trap(format!("{e:#}")))?;
        Ok(Instance { plugin, store, bindings, uses: 0 })
    }

    /// The plugin version this instance runs.
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// Run the handler on one event; on success return the effects to commit, or `None` when
    /// it called no capability but logging and config: then there is nothing to commit.
    pub async fn handle(
        &mut self,
        event: &Event,
        key: Option<&str>,
        attempt: u32,
    ) -> Result<Option<Effects>, InvokeError> {
        self.uses += 1;
        let timeout = Duration::from_millis(self.plugin.settings.limits.timeout_ms);
        let data = self.store.data_mut();
        data.invocation = Some(Invocation::new(&data.plugin, event));
        data.clear_stderr();
        data.deadline = Instant::now() + timeout;
        self.store.set_epoch_deadline(1);
        let headers: Vec<WitHeader> =
            event.headers.iter().map(|h| WitHeader { name: &h.name, value: &h.value }).collect();
        let record = to_wit(event, key, &headers, attempt);
        let call = self.bindings.switchyard_plugin_handler().call_handle(&mut self.store, record);
        // A plugin blocked in a host call (a sleep, an HTTP request) runs no wasm, so the epoch
        // deadline cannot interrupt it: this timer does. The instance is discarded after it.
        let result = tokio::time::timeout(timeout + EPOCH_TICK, call).await;
        let invocation = self.store.data_mut().invocation.take();
        let Ok(result) = result else { return Err(InvokeError::Timeout(timeout)) };
        // A refused capability call fails the invocation for good, whatever the handler made
        // of the refusal: a retry would be refused again.
        if let (Ok(_), Some(Invocation { refused: Some(reason), .. })) = (&result, &invocation) {
            return Err(InvokeError::Reject(reason.clone()));
        }
        match result {
            Ok(Ok(())) => Ok(invocation.and_then(Invocation::into_effects)),
            Ok(Err(HandlerError::Retry(reason))) => Err(InvokeError::Retry(reason)),
            Ok(Err(HandlerError::Reject(reason))) => Err(InvokeError::Reject(reason)),
            Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => Err(InvokeError::Timeout(timeout)),
            Err(e) => {
                // The root cause names the trap ("wasm `unreachable` instruction executed",
                // "forcing trap when growing memory ..."); the wasm backtrace is noise here.
                let cause = e.root_cause().to_string();
                let detail = match self.store.data().panic_message() {
                    Some(panic) => format!("{cause} ({panic})"),
                    None => cause,
                };
                Err(InvokeError::Trap(detail))
            }
        }
    }
}

fn to_wit<'a>(event: &'a Event, key: Option<&'a str>, headers: &'a [WitHeader<'a>], attempt: u32) -> WitEvent<'a> {
    WitEvent {
        id: &event.id.0,
        name: &event.name,
        source: &event.source,
        key,
        correlation_id: event.correlation_id.as_deref(),
        causation_id: event.causation_id.as_deref(),
        occurred_at: event.occurred_at.0,
        content_type: &event.content_type,
        headers,
        payload: &event.payload,
        attempt,
    }
}
