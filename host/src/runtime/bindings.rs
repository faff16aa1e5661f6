//! The one `bindgen!` over `wit/`: every other module uses these types.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    exports: { default: async },
});

pub use self::exports::switchyard::plugin::handler::Guest as Handler;
pub use self::switchyard::plugin::types::{Event as WitEvent, HandlerError, Header as WitHeader, Metadata};
