//! Child processes (Envoy, the emulator, a user's backend command) and CPU
//! accounting from /proc.

use crate::error::{BenchError, Result};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A started process in its own process group, stopped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: std::process::Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let file = std::fs::File::create(log).map_err(|e| BenchError::io(log, e))?;
        let err_file = file.try_clone().map_err(|e| BenchError::io(log, e))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .process_group(0)
            .spawn()
            .map_err(|e| BenchError::Process(format!("cannot start {name} ({}): {e}", program.display())))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Starts a shell command line (`sh -c`).
    pub fn shell(name: &str, command: &str, log: &Path) -> Result<Self> {
        Self::spawn(
            name,
            Path::new("/bin/sh"),
            &["-c".to_string(), command.to_string()],
            log,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// None while running, else a description of how it ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The last `n` bytes of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(n);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// SIGTERM to the group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let Ok(pgid) = i32::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) with a negative pid signals the process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| BenchError::Process(format!("no free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::Process(format!("no free port: {e}")))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in clock ticks (threads included).
pub fn process_ticks(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_ticks(&text)
}

/// Fields 14 and 15 of /proc/PID/stat (after the parenthesised name).
pub fn parse_process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total) ticks of all CPUs from /proc/stat.
pub fn machine_ticks() -> Option<(u64, u64)> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

pub fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Number of CPUs online.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// CPU used during a run: the machine's busy share and each process's cores.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuUsage {
    pub cores: usize,
    /// Share of all cores busy (every process on the machine, others' too).
    pub machine_busy: f64,
    /// Average cores used by each named process.
    pub processes: BTreeMap<String, f64>,
}

/// Measures CPU between `start` and `finish`.
#[derive(Debug)]
pub struct CpuMeter {
    at: Instant,
    machine: Option<(u64, u64)>,
    procs: Vec<(String, String, Option<u64>)>,
}

impl CpuMeter {
    /// `procs`: (name, pid or "self").
    pub fn start(procs: &[(String, String)]) -> Self {
        Self {
            at: Instant::now(),
            machine: machine_ticks(),
            procs: procs
                .iter()
                .map(|(n, p)| (n.clone(), p.clone(), process_ticks(p)))
                .collect(),
        }
    }

    pub fn finish(&self) -> CpuUsage {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let hz = clock_ticks();
        let machine_busy = match (self.machine, machine_ticks()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => f64::NAN,
        };
        let processes = self
            .procs
            .iter()
            .filter_map(|(name, pid, t0)| {
                let used = process_ticks(pid)?.checked_sub((*t0)?)?;
                Some((name.clone(), used as f64 / hz / wall))
            })
            .collect();
        CpuUsage {
            cores: cpus(),
            machine_busy,
            processes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_lines() {
        let s = "1234 (envoy (worker)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 8 0 100 0";
        assert_eq!(parse_process_ticks(s), Some(325));
        assert_eq!(parse_process_ticks("garbage"), None);
        let m = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_machine_ticks(m), Some((161, 981)));
        assert!(process_ticks("self").is_some());
        assert!(machine_ticks().is_some());
    }

    #[test]
    fn meter_sees_our_own_work() {
        let m = CpuMeter::start(&[("self".into(), "self".into())]);
        // Work until the kernel has counted 20 ticks of CPU time for this
        // process, however long a busy machine makes that take.
        let start = process_ticks("self").unwrap_or(0);
        let t = Instant::now();
        let mut x = 0u64;
        while process_ticks("self").unwrap_or(0) < start + 20 && t.elapsed() < Duration::from_secs(60) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        assert_ne!(x, 1);
        assert!(
            process_ticks("self").unwrap_or(0) >= start + 20,
            "no CPU time counted in 60 s"
        );
        let u = m.finish();
        assert!(u.processes["self"] > 0.0, "{u:?}");
        assert!(u.machine_busy > 0.0 && u.machine_busy <= 1.0, "{u:?}");
    }

    #[test]
    fn processes_stop_by_group() {
        let dir = std::env::temp_dir().join(format!("vlm-bench-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = Proc::shell("sleeper", "echo started; sleep 30 & wait", &dir.join("log")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(p.exited().is_none());
        let t = Instant::now();
        p.stop(Duration::from_secs(5));
        assert!(p.exited().is_some());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(p.log_tail(100).contains("started"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
