//! The traffic state in proxy-wasm shared data, one key per record,
//! updated with compare-and-swap so every worker VM sees one consistent
//! state.

use crate::core::residual::ResidualHistogram;
use crate::core::traffic::{ClusterSignal, TrafficState};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

pub const TRAFFIC_KEY: &str = "vlm_budget.traffic.v2";
pub const CLUSTER_KEY: &str = "vlm_budget.cluster.v1";
pub const PD_CLUSTER_KEY: &str = "vlm_budget.pd_cluster.v1";
pub const RESIDUALS_KEY: &str = "vlm_budget.ttft_residuals.v2";
pub const LEASE_KEY: &str = "vlm_budget.poll_lease.v1";

/// Attempts before a contended update gives up (and logs).
const CAS_ATTEMPTS: usize = 64;

fn get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Creates `key` with `value` unless it exists (call once per VM at
/// configuration, before traffic: creating is the one unprotected write).
pub fn init(key: &str, value: &[u8]) {
    if get(key).0.is_none() {
        let _ = hostcalls::set_shared_data(key, Some(value), None);
    }
}

/// Reads the traffic state.
pub fn traffic() -> TrafficState {
    decode_traffic(get(TRAFFIC_KEY).0.as_deref())
}

/// Applies `op` to the record under `key` atomically (compare-and-swap,
/// retried): `decode` reads whatever is stored (a missing or foreign value
/// reads as the initial record).
fn update<T>(
    key: &str,
    decode: fn(Option<&[u8]>) -> T,
    encode: fn(&T) -> Vec<u8>,
    op: &mut dyn FnMut(&mut T),
) -> T {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = get(key);
        let mut value = decode(bytes.as_deref());
        op(&mut value);
        match hostcalls::set_shared_data(key, Some(&encode(&value)), cas) {
            Ok(()) => return value,
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                log::error!("vlm-budget: update of {key} failed: {e:?}");
                return value;
            }
        }
    }
    log::error!("vlm-budget: update of {key} lost after {CAS_ATTEMPTS} contended attempts");
    decode(get(key).0.as_deref())
}

fn decode_traffic(bytes: Option<&[u8]>) -> TrafficState {
    bytes.map_or_else(TrafficState::initial, TrafficState::decode)
}

fn decode_residuals(bytes: Option<&[u8]>) -> ResidualHistogram {
    bytes.map(ResidualHistogram::decode).unwrap_or_default()
}

/// Applies `op` to the traffic state atomically.
pub fn update_traffic(op: &mut dyn FnMut(&mut TrafficState)) -> TrafficState {
    update(TRAFFIC_KEY, decode_traffic, |s| s.encode().to_vec(), op)
}

/// The learned TTFT residuals.
pub fn residuals() -> ResidualHistogram {
    decode_residuals(get(RESIDUALS_KEY).0.as_deref())
}

/// Applies `op` to the residuals atomically.
pub fn update_residuals(op: &mut dyn FnMut(&mut ResidualHistogram)) -> ResidualHistogram {
    update(RESIDUALS_KEY, decode_residuals, ResidualHistogram::encode, op)
}

/// The last reading stored under `key` (`CLUSTER_KEY`, `PD_CLUSTER_KEY`).
pub fn cluster(key: &str) -> Option<ClusterSignal> {
    get(key).0.and_then(|b| ClusterSignal::decode(&b))
}

/// Stores a cluster reading under `key` (last writer wins: there is one
/// poller).
pub fn set_cluster(key: &str, signal: &ClusterSignal) {
    let _ = hostcalls::set_shared_data(key, Some(&signal.encode()), None);
}

/// Takes or renews the poll lease for `owner` until `until_us`; true when
/// this VM holds it.
pub fn acquire_lease(owner: u64, now_us: u64, until_us: u64) -> bool {
    let (bytes, cas) = get(LEASE_KEY);
    if let Some(b) = &bytes {
        if b.len() == 16 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[..8]);
            let holder = u64::from_le_bytes(w);
            w.copy_from_slice(&b[8..]);
            let expiry = u64::from_le_bytes(w);
            if holder != owner && expiry > now_us {
                return false;
            }
        }
    }
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&owner.to_le_bytes());
    value[8..].copy_from_slice(&until_us.to_le_bytes());
    // A missing key has no cas: creating it is not protected, but a lost
    // race only means two polls for one tick.
    hostcalls::set_shared_data(LEASE_KEY, Some(&value), cas).is_ok()
}
