//! The one `bindgen!` over `wit/`: every other module uses these types. It covers the `core`
//! world, the switchyard part of the `plugin` world that plugins target; the WASI interfaces
//! (including `wasi:http`) are linked from wasmtime-wasi and wasmtime-wasi-http.

wasmtime::component::bindgen!({
    world: "core",
    path: "../wit",
    exports: { default: async },
    // Exports take their arguments borrowed: a handler's event is lowered into the guest
    // straight from the router's, not from a copy made for the call.
    ownership: Borrowing { duplicate_if_necessary: true },
});

pub use self::Core as Plugin;
pub use self::CorePre as PluginPre;
pub use self::exports::switchyard::plugin::handler::Guest as Handler;
pub use self::switchyard::plugin::types::{Event as WitEvent, HandlerError, HeaderParam as WitHeader, Metadata};
