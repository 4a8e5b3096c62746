//! `cargo xtask setup`: installs what building and testing need, and only what is missing.
//! Every other task calls it first; a second run changes nothing and says so.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The toolchain that builds the classifier; it must already be installed (no newer one can
/// be fetched on these machines).
const NIGHTLY: &str = "nightly";

/// Debian packages the tests and the demo use, with a command each provides.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[("iproute2", "ip"), ("procps", "sysctl"), ("mount", "mount")];

pub fn run() -> Result<()> {
    let mut did = Vec::new();
    if ensure_rust_src()? {
        did.push("rust-src for nightly");
    }
    if ensure_bpf_linker()? {
        did.push("bpf-linker");
    }
    if ensure_debian_packages(DEBIAN_PACKAGES)? {
        did.push("Debian packages");
    }
    if did.is_empty() {
        eprintln!("setup: nothing to do (rust-src, bpf-linker and Debian packages are installed)");
    } else {
        eprintln!("setup: installed {}", did.join(", "));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<bool> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
        .context("the nightly toolchain is required to build the eBPF program")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(false);
    }
    crate::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    Ok(true)
}

/// bpf-linker must link against the nightly's own LLVM. Its rpath points into the LLVM
/// prefix, so the prefix lives in a permanent place outside the repository.
fn ensure_bpf_linker() -> Result<bool> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(false);
    }
    let sysroot = output(Command::new("rustc").arg(format!("+{NIGHTLY}")).args(["--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .context("libLLVM version")?
        .to_owned();
    let prefix = llvm_prefix();
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker against {llvm} (about a minute)");
    crate::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "0.13.0", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(true)
}

fn llvm_prefix() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/policy-enforcer/llvm")
}

/// Installs the packages whose command is missing; returns whether it installed any.
pub fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<bool> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(package, command)| !has_command(command) && !dpkg_installed(package))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    crate::run(Command::new("apt-get").arg("update").arg("-q"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(true)
}

fn has_command(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
        || ["/usr/sbin", "/sbin", "/usr/bin"].iter().any(|dir| PathBuf::from(dir).join(command).is_file())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}
