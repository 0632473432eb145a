//! Metrics every worker shares: the registry and its Prometheus text exposition
//! (`registry.rs`, no mlua; its series are `series.rs`, the format's lexical rules
//! `text.rs`) and its Lua surface, `luaproxy.metrics` (`lua.rs`).
//! Imports point down: lua -> registry -> series, text.

pub mod builtin;
pub mod lua;
pub mod registry;
pub mod series;
#[cfg(test)]
mod tests;
pub mod text;

pub use registry::{
    registry, Kind, Metric, Registry, Series, SeriesCache, CONTENT_TYPE, DEFAULT_BUCKETS,
};
