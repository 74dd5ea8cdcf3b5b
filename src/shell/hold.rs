//! Holding request headers until the body is decided (`hold_headers`), and
//! the watchdog that makes a mismatched configuration safe.
//!
//! With Envoy's plugin-config flag `allow_on_headers_stop_iteration: true`
//! a Pause from the request headers callback is `StopIteration`: the headers
//! wait in Envoy while the body callbacks still run, and they go upstream
//! with the body once the filter continues — so the upstream sees only
//! complete, final requests. Without the flag the same Pause stops the body
//! too (`StopAllIterationAndWatermark`) and no body callback would ever come.
//! The plugin cannot read that flag, so each VM finds out:
//!
//! - until a body callback has come for a request whose headers it paused,
//!   the VM's state is `Unknown` and every such request is watched;
//! - that body callback proves the flag is on: `Held`, nothing watched any more;
//! - a watched request that has seen no body callback after [`CHECK_MS`]
//!   means the flag is off: the watchdog (the root context's tick) resumes
//!   every watched request, logs an error, and the VM stops holding
//!   (`Forwarding`): headers then go upstream at once, as without
//!   `hold_headers`. A misconfigured VM delays its first requests by about
//!   [`CHECK_MS`] and never hangs one.
//!
//! A client slower than [`CHECK_MS`] to send its first body bytes on a
//! fresh VM reads the same as a missing flag; that VM then forwards headers
//! at once (today's behaviour), which is safe, and says so in its log.

use std::cell::{Cell, RefCell};

/// How long a paused request may go without a body callback before the VM
/// concludes that Envoy stopped the body too.
pub const CHECK_MS: u64 = 1000;

/// The root context's tick while the VM's state is unknown.
pub const TICK_MS: u64 = 250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Unknown,
    Held,
    Forwarding,
}

thread_local! {
    static STATUS: Cell<Status> = const { Cell::new(Status::Unknown) };
    /// Requests whose headers were paused while the status was unknown:
    /// (context id, paused at, µs).
    static WATCHED: RefCell<Vec<(u32, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Whether this VM may pause request headers.
pub fn may_hold() -> bool {
    STATUS.with(Cell::get) != Status::Forwarding
}

/// Whether the watchdog still has work (the tick is needed).
pub fn undecided() -> bool {
    STATUS.with(Cell::get) == Status::Unknown
}

/// The headers of `context` were paused to wait for its body.
pub fn paused(context: u32, now_us: u64) {
    if undecided() {
        WATCHED.with(|w| w.borrow_mut().push((context, now_us)));
    }
}

/// A body callback came for `context`: if its headers were paused and not
/// resumed by the watchdog, the host keeps body callbacks running.
pub fn body_seen(context: u32) {
    let watched = WATCHED.with(|w| w.borrow().iter().any(|&(c, _)| c == context));
    if watched {
        STATUS.with(|s| s.set(Status::Held));
        WATCHED.with(|w| w.borrow_mut().clear());
        log::info!("vlm-budget: request headers are held until the body is decided");
    }
}

/// The stream of `context` is over.
pub fn done(context: u32) {
    WATCHED.with(|w| w.borrow_mut().retain(|&(c, _)| c != context));
}

/// The watchdog: the contexts to resume now (all watched ones, once one
/// has waited [`CHECK_MS`] without a body callback).
pub fn expired(now_us: u64) -> Vec<u32> {
    let stale = WATCHED.with(|w| {
        w.borrow()
            .iter()
            .any(|&(_, at)| now_us.saturating_sub(at) >= CHECK_MS * 1000)
    });
    if !stale || !undecided() {
        return Vec::new();
    }
    STATUS.with(|s| s.set(Status::Forwarding));
    log::error!(
        "vlm-budget: hold_headers is on but no request body arrived while headers were paused: \
         set allow_on_headers_stop_iteration: true in the Wasm plugin config (Envoy >= 1.35). \
         Headers now go upstream at once"
    );
    WATCHED.with(|w| w.borrow_mut().drain(..).map(|(c, _)| c).collect())
}
