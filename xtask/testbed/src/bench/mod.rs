//! The pieces of `cargo xtask bench` (`src/bin/bench.rs`): BPF_PROG_TEST_RUN timing of the
//! classifier, UDP floods and TCP throughput over veths next to iptables, ipset and nftables,
//! control-plane timings (among them route-to-attach latency), and the report (Markdown, JSON, SVG). Needs root.

pub mod attach;
pub mod control;
pub mod crr;
pub mod datapath;
pub mod flood;
pub mod report;
pub mod scale;
pub mod tiers;

use serde::{Deserialize, Serialize};

/// Median of `values` (NaN for none).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Nearest-rank percentile (`p` in 0..=100) of `values` (NaN for none).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    if (p - 50.0).abs() < f64::EPSILON && v.len().is_multiple_of(2) {
        let mid = v.len() / 2;
        return (v[mid - 1] + v[mid]) / 2.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// What the numbers were measured on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub virtualization: String,
    pub bpf_jit: String,
    pub git_commit: String,
    pub date: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let hypervisor = cpuinfo.lines().find(|l| l.starts_with("flags")).is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let kernel = cmd_out(&["uname", "-r"]);
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let virt = cmd_out(&["systemd-detect-virt"]);
        let virtualization = if !virt.is_empty() && virt != "none" {
            virt
        } else if hypervisor {
            "virtual machine".to_owned()
        } else {
            "bare metal (no hypervisor flag)".to_owned()
        };
        let bpf_jit = match std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").map(|s| s.trim().to_owned()) {
            Ok(s) if s == "0" => "off".to_owned(),
            Ok(_) => "on".to_owned(),
            Err(_) => "unknown".to_owned(),
        };
        let mut git_commit = cmd_out(&["git", "rev-parse", "--short=12", "HEAD"]);
        if !cmd_out(&["git", "status", "--porcelain", "--untracked-files=no"]).is_empty() {
            git_commit.push_str(" (with uncommitted changes)");
        }
        let date = cmd_out(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]);
        Self { cpu_model, cores, kernel, memory_gib, virtualization, bpf_jit, git_commit, date }
    }
}

fn cmd_out(args: &[&str]) -> String {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Busy and total CPU time of the whole machine, from /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTicks {
    pub busy: u64,
    pub total: u64,
}

impl CpuTicks {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return Self::default() };
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal guest guest_nice
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        let total = (0..8).map(get).sum();
        let busy = total - get(3) - get(4);
        Self { busy, total }
    }

    /// Busy nanoseconds since `earlier`.
    pub fn busy_ns_since(&self, earlier: &Self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (self.busy.saturating_sub(earlier.busy)) as f64 * 1e9 / hz
    }
}

/// CPU time of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
pub fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

/// Progress on stderr, with the time since the run started.
pub fn log(msg: impl AsRef<str>) {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    eprintln!("[bench {:6.1}s] {}", start.elapsed().as_secs_f64(), msg.as_ref());
}
