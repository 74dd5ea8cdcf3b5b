//! The traffic state in proxy-wasm shared data, one key per record,
//! updated with compare-and-swap so every worker VM sees one consistent
//! state.

use crate::core::traffic::{ClusterSignal, TrafficState};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

pub const TRAFFIC_KEY: &str = "vlm_budget.traffic.v1";
pub const CLUSTER_KEY: &str = "vlm_budget.cluster.v1";
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
    get(TRAFFIC_KEY)
        .0
        .map_or_else(TrafficState::initial, |b| TrafficState::decode(&b))
}

/// Applies `op` to the traffic state atomically.
pub fn update_traffic(op: &mut dyn FnMut(&mut TrafficState)) -> TrafficState {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = get(TRAFFIC_KEY);
        let mut state = bytes.map_or_else(TrafficState::initial, |b| TrafficState::decode(&b));
        op(&mut state);
        match hostcalls::set_shared_data(TRAFFIC_KEY, Some(&state.encode()), cas) {
            Ok(()) => return state,
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                log::error!("vlm-budget: traffic update failed: {e:?}");
                return state;
            }
        }
    }
    log::error!("vlm-budget: traffic update lost after {CAS_ATTEMPTS} contended attempts");
    traffic()
}

/// The last cluster reading.
pub fn cluster() -> Option<ClusterSignal> {
    get(CLUSTER_KEY).0.and_then(|b| ClusterSignal::decode(&b))
}

/// Stores a cluster reading (last writer wins: there is one poller).
pub fn set_cluster(signal: &ClusterSignal) {
    let _ = hostcalls::set_shared_data(CLUSTER_KEY, Some(&signal.encode()), None);
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
