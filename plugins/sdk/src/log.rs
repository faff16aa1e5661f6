//! Lines in the router's log, tagged by the router with the plugin's name and the event id.
//!
//! The macros (`log::debug!("{} seen", id)`) format their line only when the router writes
//! that level; the functions take a line already made.

use crate::bindings::switchyard::plugin::log::log;
pub use crate::bindings::switchyard::plugin::log::{Level, enabled};

pub fn trace(message: &str) {
    log(Level::Trace, message);
}

pub fn debug(message: &str) {
    log(Level::Debug, message);
}

pub fn info(message: &str) {
    log(Level::Info, message);
}

pub fn warn(message: &str) {
    log(Level::Warn, message);
}

pub fn error(message: &str) {
    log(Level::Error, message);
}

/// Format a line with `format!`'s arguments and log it at `level`, if the router writes that
/// level. The per-level macros (`log::info!`, …) call this one.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_at {
    ($level:ident, $($arg:tt)+) => {
        if $crate::log::enabled($crate::log::Level::$level) {
            $crate::bindings::switchyard::plugin::log::log($crate::log::Level::$level, &::std::format!($($arg)+));
        }
    };
}

/// `log::trace!("…", args)`: formatted only when the router writes `trace` lines.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_trace {
    ($($arg:tt)+) => { $crate::__log_at!(Trace, $($arg)+) };
}

/// `log::debug!("…", args)`: formatted only when the router writes `debug` lines.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug {
    ($($arg:tt)+) => { $crate::__log_at!(Debug, $($arg)+) };
}

/// `log::info!("…", args)`: formatted only when the router writes `info` lines.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_info {
    ($($arg:tt)+) => { $crate::__log_at!(Info, $($arg)+) };
}

/// `log::warn!("…", args)`: formatted only when the router writes `warn` lines.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn {
    ($($arg:tt)+) => { $crate::__log_at!(Warn, $($arg)+) };
}

/// `log::error!("…", args)`: formatted only when the router writes `error` lines.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_error {
    ($($arg:tt)+) => { $crate::__log_at!(Error, $($arg)+) };
}

pub use crate::{
    __log_debug as debug, __log_error as error, __log_info as info, __log_trace as trace, __log_warn as warn,
};
