//! The guest SDK: a switchyard plugin is a type implementing [`Plugin`] and one
//! [`plugin!`] line. It wraps the wit-bindgen bindings of `wit/switchyard.wit` so that a
//! handler works on typed, serde-decoded events ([`Event::json`]), typed store collections
//! ([`Collection`]), typed publishing ([`publish`]), [`log`], [`config`] values and outbound
//! [`http`], and returns an [`Error`] that says whether the router retries or dead-letters.
//!
//! ```ignore
//! use switchyard_sdk::{Collection, Event, Metadata, Plugin, Result};
//!
//! static GREETINGS: Collection<Greeting> = Collection::new("greetings");
//!
//! struct Greeter;
//!
//! impl Plugin for Greeter {
//!     fn metadata() -> Metadata {
//!         Metadata::new("greeter", env!("CARGO_PKG_VERSION")).subscribe(["user.created"])
//!     }
//!
//!     fn handle(event: Event) -> Result<()> {
//!         let user: User = event.json()?;
//!         GREETINGS.put(&user.id, &Greeting { text: format!("hello {}", user.name) })
//!     }
//! }
//!
//! switchyard_sdk::plugin!(Greeter);
//! ```

pub mod config;
mod error;
mod event;
pub mod http;
pub mod log;
mod metadata;
mod publish;
mod store;

pub use error::{Error, Result};
pub use event::Event;
pub use metadata::Metadata;
pub use publish::{Outgoing, publish};
pub use store::{Collection, Document, Pages, Value};

/// The raw bindings of the `switchyard:plugin/plugin` world, for what the SDK does not wrap.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "switchyard:plugin/plugin",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export_bindings",
        default_bindings_module: "switchyard_sdk::bindings",
    });
}

/// A plugin: what it is, and what it does with one event.
pub trait Plugin {
    /// Name, version, subscriptions, ordering key and indexes. Called once when the router
    /// loads the plugin; must not use the store.
    fn metadata() -> Metadata;

    /// Handle one event. `Ok` commits every store write and publish of this call, atomically,
    /// and acknowledges the event; an [`Error`] commits nothing.
    fn handle(event: Event) -> Result<()>;
}

/// Export a [`Plugin`] type as the component's `handler`. Use once per plugin crate, whose
/// `crate-type` is `cdylib`.
#[macro_export]
macro_rules! plugin {
    ($plugin:ty) => {
        struct __SwitchyardExport;

        impl $crate::bindings::exports::switchyard::plugin::handler::Guest for __SwitchyardExport {
            fn metadata() -> $crate::bindings::switchyard::plugin::types::Metadata {
                <$plugin as $crate::Plugin>::metadata().into_wit()
            }

            fn handle(
                event: $crate::bindings::switchyard::plugin::types::Event,
            ) -> ::core::result::Result<(), $crate::bindings::switchyard::plugin::types::HandlerError> {
                <$plugin as $crate::Plugin>::handle($crate::Event::from(event)).map_err($crate::Error::into_wit)
            }
        }

        $crate::bindings::export_bindings!(__SwitchyardExport with_types_in $crate::bindings);
    };
}

mod id;
pub use id::Id;
