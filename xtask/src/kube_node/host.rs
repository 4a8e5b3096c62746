//! What `up` changes on the host, written down before each change, and `down`, which undoes
//! it from that record alone: a fresh process, or one after a killed `up`, cleans up the
//! same way. The record is a line-based journal (`WORK/state`): each line names one thing to
//! undo, appended before the thing is done, so that a crash between the two leaves at worst
//! an entry whose undo is a no-op.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use super::{RUN_DIR, STATE_FILE, WORK_DIR};

/// One thing `up` did that `down` undoes.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A directory `up` created (removed with its contents after unmounting under it).
    Dir(PathBuf),
    /// A file or symlink `up` created.
    File(PathBuf),
    /// A file that was in the way, moved aside (`from` is restored from `to`).
    Moved { from: PathBuf, to: PathBuf },
    /// A sysctl and its value before `up` (or before kubelet and kube-proxy, which set some).
    Sysctl { key: String, old: String },
    /// A network interface `up` created.
    Link(String),
    /// `ip route` arguments of a route `up` added.
    Route(String),
    /// `up` added its safety chain; kubelet, kube-proxy and CNI add KUBE-* / CNI-* chains.
    Iptables,
    /// A process `up` started: a name for messages, its PID and its executable.
    Pid { name: String, pid: u32, exe: PathBuf },
    /// A bpffs `up` mounted.
    Mount(PathBuf),
    /// Network namespaces that existed before `up` (containerd names its own `cni-*`).
    NetnsBefore(Vec<String>),
}

impl Entry {
    fn to_line(&self) -> String {
        let p = |p: &Path| p.display().to_string();
        match self {
            Entry::Dir(d) => format!("dir {}", p(d)),
            Entry::File(f) => format!("file {}", p(f)),
            Entry::Moved { from, to } => format!("moved {} {}", p(from), p(to)),
            Entry::Sysctl { key, old } => format!("sysctl {key} {old}"),
            Entry::Link(l) => format!("link {l}"),
            Entry::Route(r) => format!("route {r}"),
            Entry::Iptables => "iptables".into(),
            Entry::Pid { name, pid, exe } => format!("pid {name} {pid} {}", p(exe)),
            Entry::Mount(m) => format!("mount {}", p(m)),
            Entry::NetnsBefore(list) => format!("netns-before {}", list.join(" ")),
        }
    }

    fn parse(line: &str) -> Option<Entry> {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        let mut words = rest.split_whitespace();
        Some(match kind {
            "dir" => Entry::Dir(rest.into()),
            "file" => Entry::File(rest.into()),
            "moved" => Entry::Moved { from: words.next()?.into(), to: words.next()?.into() },
            "sysctl" => Entry::Sysctl { key: words.next()?.into(), old: words.collect::<Vec<_>>().join(" ") },
            "link" => Entry::Link(rest.into()),
            "route" => Entry::Route(rest.into()),
            "iptables" => Entry::Iptables,
            "pid" => Entry::Pid { name: words.next()?.into(), pid: words.next()?.parse().ok()?, exe: words.next()?.into() },
            "mount" => Entry::Mount(rest.into()),
            "netns-before" => Entry::NetnsBefore(words.map(str::to_owned).collect()),
            _ => return None,
        })
    }
}

/// Appends `entry` to the journal (creating the work directory and journal on first use).
pub fn record(entry: Entry) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(STATE_FILE)
        .with_context(|| format!("open {STATE_FILE}"))?;
    writeln!(file, "{}", entry.to_line()).with_context(|| format!("write {STATE_FILE}"))?;
    file.sync_data().ok();
    Ok(())
}

pub fn journal() -> Vec<Entry> {
    std::fs::read_to_string(STATE_FILE).unwrap_or_default().lines().filter_map(Entry::parse).collect()
}

/// Creates `dir` and every missing parent, recording each one created.
pub fn create_dir(dir: &Path) -> Result<()> {
    let mut missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    missing.reverse();
    for d in missing {
        record(Entry::Dir(d.to_path_buf()))?;
        std::fs::create_dir(d).with_context(|| format!("create {}", d.display()))?;
    }
    Ok(())
}

/// Sets a sysctl (`net/ipv4/ip_forward` form), recording its old value once.
pub fn set_sysctl(key: &str, value: &str) -> Result<()> {
    save_sysctl(key)?;
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).with_context(|| format!("write {}", path.display()))
}

/// Records a sysctl's current value (for those kubelet or kube-proxy set themselves).
pub fn save_sysctl(key: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let Ok(old) = std::fs::read_to_string(&path) else { return Ok(()) };
    let already = journal().iter().any(|e| matches!(e, Entry::Sysctl { key: k, .. } if k == key));
    if !already {
        record(Entry::Sysctl { key: key.into(), old: old.trim().into() })?;
    }
    Ok(())
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| format!("spawn {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command whose failure is expected in cleanup (the thing is already gone).
pub fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `pid` still runs `exe` (a recycled PID is not ours).
pub fn is_ours(pid: u32, exe: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe)
}

/// SIGTERM, then SIGKILL after `grace_ms`, of a recorded process still running `exe`.
pub fn stop_pid(name: &str, pid: u32, exe: &Path, grace_ms: u64) {
    if !is_ours(pid, exe) {
        return;
    }
    eprintln!("kube-node: stopping {name} (pid {pid})");
    quiet("kill", &["-TERM", &pid.to_string()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(grace_ms);
    while is_ours(pid, exe) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if is_ours(pid, exe) {
        quiet("kill", &["-KILL", &pid.to_string()]);
    }
}

/// Mount points at or under one of `roots`, deepest first.
pub fn mounts_under(roots: &[&Path]) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| roots.iter().any(|r| m.starts_with(r)))
        .collect();
    found.sort();
    found.dedup();
    found.reverse();
    found
}

/// The directories `down` unmounts under besides the recorded ones: ours and the ones kubelet
/// and containerd hard-code.
pub fn mount_roots() -> Vec<PathBuf> {
    vec![PathBuf::from(WORK_DIR), PathBuf::from(RUN_DIR), PathBuf::from("/run/containerd"), PathBuf::from("/var/lib/kubelet")]
}
