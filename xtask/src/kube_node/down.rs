//! `cargo xtask kube-node down`: undoes the journal, in an order where nothing restarts what
//! was just stopped: kubelet before the pods, the pods before containerd, the processes before
//! their network namespaces and mounts, the mounts before the directories.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{
    CONTAINERD_SOCK, IPTABLES_CHAIN, POD_CIDR, STATE_FILE,
    host::{Entry, journal, mount_roots, mounts_under, quiet, sh, stop_pid},
};

/// Components, in the order they stop (reverse of start, kubelet and kube-proxy first).
const STOP_ORDER: &[&str] = &["kube-proxy", "kubelet", "kube-scheduler", "kube-controller-manager", "containerd", "kube-apiserver", "etcd"];

pub fn down() -> Result<()> {
    let entries = journal();
    if entries.is_empty() && !Path::new(STATE_FILE).exists() {
        // Even without a journal: a pod network namespace an earlier run left behind still
        // holds its veth and its address's route, and the next run's IPAM hands that address
        // out again.
        delete_leftover_pod_netns();
        eprintln!("kube-node: nothing to tear down ({STATE_FILE} does not exist)");
        return Ok(());
    }
    stop_processes(&entries);
    delete_netns(&entries);
    delete_leftover_pod_netns();
    unmount(&entries);
    remove_kubepods_cgroups();
    if entries.contains(&Entry::Iptables) {
        for tool in ["iptables", "ip6tables"] {
            remove_chains(tool);
        }
    }
    for entry in entries.iter().rev() {
        undo(entry);
    }
    let _ = std::fs::remove_file(STATE_FILE);
    eprintln!("kube-node: down");
    Ok(())
}

fn stop_processes(entries: &[Entry]) {
    let pids: Vec<(&String, u32, &PathBuf)> = entries
        .iter()
        .filter_map(|e| if let Entry::Pid { name, pid, exe } = e { Some((name, *pid, exe)) } else { None })
        .collect();
    for component in STOP_ORDER {
        if *component == "containerd" {
            // The pods' processes, and the shims that hold them, outlive kubelet: kill them
            // while containerd can still be asked, then by cgroup and by our socket.
            kill_pods();
        }
        for (name, pid, exe) in pids.iter().filter(|(n, ..)| n.as_str() == *component) {
            stop_pid(name, *pid, exe, 10_000);
        }
    }
    for (name, pid, exe) in &pids {
        stop_pid(name, *pid, exe, 5_000);
    }
}

/// Every process in kubelet's `kubepods` cgroups (the pods' containers), then the runc shims
/// started by our containerd (their command line names our socket).
fn kill_pods() {
    for _ in 0..3 {
        let pids = kubepods_pids();
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            quiet("kill", &["-KILL", &pid.to_string()]);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    for pid in shims() {
        quiet("kill", &["-KILL", &pid.to_string()]);
    }
}

fn kubepods_dirs() -> Vec<PathBuf> {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
    let mut dirs = Vec::new();
    for controller in controllers.flatten() {
        let root = controller.path().join("kubepods");
        if root.is_dir() {
            walk(&root, &mut dirs);
        }
    }
    dirs
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&child.path(), out);
            }
        }
    }
}

fn kubepods_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = kubepods_dirs()
        .iter()
        .flat_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect::<Vec<_>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn shims() -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args.windows(2).any(|w| w[0] == b"-address" && w[1] == CONTAINERD_SOCK.as_bytes())
        })
        .collect()
}

/// The `cni-*` namespaces containerd made for pods (not those that existed before `up`).
fn delete_netns(entries: &[Entry]) {
    let before: Vec<&String> = entries.iter().filter_map(|e| if let Entry::NetnsBefore(l) = e { Some(l) } else { None }).flatten().collect();
    let Ok(list) = std::fs::read_dir("/run/netns") else { return };
    for ns in list.flatten() {
        let name = ns.file_name().to_string_lossy().into_owned();
        if name.starts_with("cni-") && !before.contains(&&name) && entries.iter().any(|e| matches!(e, Entry::NetnsBefore(_))) {
            quiet("ip", &["netns", "delete", &name]);
        }
    }
}

/// containerd's `cni-*` namespaces holding an address of our pod range: pods of an earlier
/// run of ours (a namespace that existed before `up` but holds one is ours all the same).
fn delete_leftover_pod_netns() {
    let Ok(list) = std::fs::read_dir("/run/netns") else { return };
    let prefix = POD_CIDR.rsplit_once('.').map_or(POD_CIDR, |(net, _)| net);
    for ns in list.flatten() {
        let name = ns.file_name().to_string_lossy().into_owned();
        if !name.starts_with("cni-") {
            continue;
        }
        let addrs = std::process::Command::new("ip").args(["-n", &name, "-o", "-4", "addr", "show"]).output();
        if addrs.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {prefix}."))) {
            eprintln!("kube-node: removing {name}, a pod network namespace of an earlier run");
            quiet("ip", &["netns", "delete", &name]);
        }
    }
}

fn unmount(entries: &[Entry]) {
    let roots = mount_roots();
    let roots: Vec<&Path> = roots.iter().map(PathBuf::as_path).collect();
    for _ in 0..3 {
        for m in mounts_under(&roots) {
            quiet("umount", &["-l", &m.display().to_string()]);
        }
    }
    for entry in entries.iter().rev() {
        if let Entry::Mount(m) = entry {
            quiet("umount", &["-l", &m.display().to_string()]);
        }
    }
}

fn remove_kubepods_cgroups() {
    let mut dirs = kubepods_dirs();
    dirs.sort();
    for dir in dirs.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Our safety chain, and the KUBE-* and CNI-* chains with every rule that jumps to them
/// (kube-proxy's, kubelet's, the CNI plugins').
fn remove_chains(tool: &str) {
    let save = format!("{tool}-save");
    let Ok(dump) = sh(&save, &[]) else { return };
    let ours = |chain: &str| chain == IPTABLES_CHAIN || chain.starts_with("KUBE-") || chain.starts_with("CNI-");
    let mut table = String::new();
    let mut chains = Vec::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let jumps = rule.split_whitespace().skip_while(|w| *w != "-j" && *w != "-g").nth(1).is_some_and(ours);
            if !ours(chain) && jumps {
                let args: Vec<String> = shell_words(rule);
                let mut cmd: Vec<&str> = vec!["-t", &table, "-D"];
                cmd.extend(args.iter().map(String::as_str));
                quiet(tool, &cmd);
            }
        } else if let Some(chain) = line.strip_prefix(':').and_then(|c| c.split_whitespace().next())
            && ours(chain)
        {
            chains.push((table.clone(), chain.to_owned()));
        }
    }
    for (table, chain) in &chains {
        quiet(tool, &["-t", table, "-F", chain]);
    }
    for (table, chain) in &chains {
        quiet(tool, &["-t", table, "-X", chain]);
    }
}

/// Splits an iptables-save rule into arguments (double-quoted comments stay one word).
fn shell_words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn undo(entry: &Entry) {
    match entry {
        Entry::Dir(d) => {
            let _ = std::fs::remove_dir_all(d);
        }
        Entry::File(f) => {
            let _ = std::fs::remove_file(f);
        }
        Entry::Moved { from, to } => {
            if to.exists() {
                let _ = std::fs::remove_file(from);
                let _ = std::fs::rename(to, from);
            }
        }
        Entry::Sysctl { key, old } => {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), old);
        }
        Entry::Link(l) => {
            quiet("ip", &["link", "delete", l]);
        }
        Entry::Route(r) => {
            let mut args = vec!["route", "delete"];
            args.extend(r.split_whitespace());
            quiet("ip", &args);
        }
        Entry::Iptables | Entry::Pid { .. } | Entry::Mount(_) | Entry::NetnsBefore(_) => {}
    }
}
