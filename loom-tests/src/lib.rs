//! loom models of the runtime's concurrency protocols (filled by the loom
//! issue; see the README).
