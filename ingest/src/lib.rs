//! The ingest stage: usage events in, validated and decoded events out.
//!
//! Every event passes the same validation whether it comes from a file, stdin or (with
//! the streaming services) HTTP. A bad line never stops a run: it becomes a reject that
//! names the line, the field and the reason, and is kept.
//!
//! Layout:
//! - [`lines`]: JSON-lines input decoded on several threads, delivered in file order.

pub mod lines;

pub use lines::{decode_lines, Line, LineReject};
