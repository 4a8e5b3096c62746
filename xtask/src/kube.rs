//! `cargo xtask kube`: the Kubernetes v1.20.2 binaries, built offline from Debian's
//! `kubernetes` source package (the upstream tree with `vendor/`) and cached outside the
//! repository, keyed by version: kube-apiserver and kubectl for the real-API-server tests, the
//! rest of a node (kubelet, kube-scheduler, kube-controller-manager, kube-proxy) for
//! `cargo xtask kube-node`, and the upstream e2e suite (e2e.test, ginkgo, agnhost) plus a static
//! `pause` for `cargo xtask kube-e2e`. The first run builds everything (about 15 minutes on two
//! cores), later runs reuse. etcd comes from the `etcd-server` package.
//!
//! The recipe: `apt-get source kubernetes` through a private deb-src list (the machine's apt
//! configuration is not touched), the vendored `github.com/modern-go/reflect2` v1.0.1 (which
//! crashes under Go 1.18 and later) replaced by v1.0.2 from
//! `golang-github-modern-go-reflect2-dev`, then three `make WHAT=...` runs (the node's
//! commands; agnhost and ginkgo; e2e.test) with Go 1.19, `GOFLAGS=-mod=vendor GOPROXY=off
//! CGO_ENABLED=0`. agnhost goes through `make` too: a plain `go build` of it fails under
//! `-mod=vendor`. The pause container's `build/pause/linux/pause.c` is compiled with
//! `gcc -static` before the tree goes.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The Kubernetes version the tests run against; part of the cache key.
pub const KUBE_VERSION: &str = "v1.20.2";
/// Debian's upstream version of that release (the source directory's suffix).
const DEBIAN_UPSTREAM: &str = "1.20.5+really1.20.2";
/// What the tests read to find the binaries (`kube-apiserver`, `kubectl`; `etcd` on PATH).
pub const BIN_ENV: &str = "POLICY_KUBE_BIN";
/// Written last into the binary directory: a directory without it (or with another recipe)
/// is rebuilt. Change it when the recipe changes.
const STAMP: &str = "kubernetes v1.20.2 from Debian source 1.20.5+really1.20.2, go 1.19, reflect2 v1.0.2, CGO_ENABLED=0; \
                     node, e2e.test, ginkgo, agnhost, static pause\n";
/// The `make WHAT=...` runs, in order, and what each leaves in `_output/bin`.
const MAKE_TARGETS: &[&str] = &[
    "cmd/kubelet cmd/kube-scheduler cmd/kube-controller-manager cmd/kube-apiserver cmd/kubectl cmd/kube-proxy",
    "test/images/agnhost vendor/github.com/onsi/ginkgo/ginkgo",
    "test/e2e/e2e.test",
];
/// Everything cached; the first six answer `--version` with the release.
pub const BINARIES: &[&str] =
    &["kube-apiserver", "kubectl", "kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy", "agnhost", "ginkgo", "e2e.test", "pause"];
const VERSIONED: usize = 6;
const GO: &str = "/usr/lib/go-1.19/bin/go";
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

/// Packages the build and the tests need, each with a file that proves it is installed
/// (absolute paths: another Go or etcd on PATH must not count).
const PACKAGES: &[(&str, &str)] = &[
    ("golang-1.19-go", GO),
    ("golang-github-modern-go-reflect2-dev", "/usr/share/gocode/src/github.com/modern-go/reflect2/go.mod"),
    ("etcd-server", "/usr/bin/etcd"),
    ("rsync", "rsync"),
    ("make", "make"),
    ("dpkg-dev", "dpkg-source"),
    ("xz-utils", "xz"),
    ("openssl", "openssl"),
    ("gcc", "gcc"),
    ("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"),
];

/// `~/.cache/policy-enforcer/kubernetes-v1.20.2` (or under `$XDG_CACHE_HOME`).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from).join(".cache")
    });
    base.join("policy-enforcer").join(format!("kubernetes-{KUBE_VERSION}"))
}

/// Ensures the packages and the binaries; returns the directory holding them (`kube-apiserver`
/// and `kubectl` for the kube suite, all of [`BINARIES`] for the node).
pub fn ensure() -> Result<PathBuf> {
    crate::setup::ensure_debian_packages(PACKAGES)?;
    let cache = cache_dir();
    let bin = cache.join("bin");
    if cached(&bin) {
        eprintln!("kube: reusing {KUBE_VERSION} binaries in {}", bin.display());
        return Ok(bin);
    }
    let started = std::time::Instant::now();
    eprintln!("kube: building Kubernetes {KUBE_VERSION} (node, e2e suite) from Debian's source package (about 15 minutes)");
    let work = cache.join(format!("build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let result = build(&work, &cache, &bin);
    // The tree and the Go cache take gigabytes; only the binaries are kept.
    let _ = std::fs::remove_dir_all(&work);
    result?;
    eprintln!("kube: built in {:.0?}; cached in {}", started.elapsed(), bin.display());
    Ok(bin)
}

fn cached(bin: &Path) -> bool {
    std::fs::read_to_string(bin.join(".stamp")).is_ok_and(|s| s == STAMP)
        && BINARIES[..VERSIONED].iter().all(|b| version_ok(&bin.join(b)))
        && BINARIES[VERSIONED..].iter().all(|b| bin.join(b).is_file())
}

fn version_ok(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(KUBE_VERSION))
        || Command::new(binary)
            .args(["version", "--client", "--short"])
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(KUBE_VERSION))
}

fn build(work: &Path, cache: &Path, bin: &Path) -> Result<()> {
    let tree = fetch_source(work)?;
    replace_reflect2(&tree)?;
    let path = format!("{}:{}", Path::new(GO).parent().expect("go dir").display(), std::env::var("PATH").unwrap_or_default());
    for what in MAKE_TARGETS {
        let started = std::time::Instant::now();
        let status = Command::new("nice")
            .args(["make", &format!("WHAT={what}")])
            .current_dir(&tree)
            .env("PATH", &path)
            .env("GOFLAGS", "-mod=vendor")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", work.join("go-build"))
            .env("GOPATH", work.join("gopath"))
            .status()
            .context("spawn make")?;
        ensure!(status.success(), "make WHAT=\"{what}\" failed: {status}");
        eprintln!("kube: make WHAT=\"{what}\" took {:.0?}", started.elapsed());
    }
    // The pause container's init: static, so that it runs in an image holding nothing else.
    let pause = tree.join("_output/bin/pause");
    run_in(Command::new("gcc").args(["-static", "-O2", "-o"]).arg(&pause).arg("build/pause/linux/pause.c"), &tree)?;
    // Into a fresh directory, stamped last, then renamed: a half-built cache never counts.
    let staging = cache.join(format!("bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    for (i, name) in BINARIES.iter().enumerate() {
        let from = tree.join("_output/bin").join(name);
        std::fs::copy(&from, staging.join(name)).with_context(|| format!("copy {}", from.display()))?;
        ensure!(i >= VERSIONED || version_ok(&staging.join(name)), "{name} does not report {KUBE_VERSION}");
    }
    std::fs::write(staging.join(".stamp"), STAMP)?;
    let _ = std::fs::remove_dir_all(bin);
    std::fs::rename(&staging, bin).with_context(|| format!("rename to {}", bin.display()))?;
    Ok(())
}

/// `apt-get source kubernetes` with a private sources list (deb-src of this Debian release) and
/// private lists: returns the unpacked tree.
fn fetch_source(work: &Path) -> Result<PathBuf> {
    let codename = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(|v| v.trim_matches('"').to_owned())))
        .unwrap_or_else(|| "bookworm".into());
    let apt = work.join("apt");
    std::fs::create_dir_all(apt.join("lists/partial"))?;
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    std::fs::write(
        apt.join("sources.list"),
        format!(
            "deb-src [signed-by={keyring}] http://deb.debian.org/debian {codename} main\n\
             deb-src [signed-by={keyring}] http://deb.debian.org/debian-security {codename}-security main\n"
        ),
    )?;
    let options = |cmd: &mut Command| {
        cmd.arg("-q")
            .arg(format!("-oDir::Etc::SourceList={}", apt.join("sources.list").display()))
            .arg("-oDir::Etc::SourceParts=/dev/null")
            .arg(format!("-oDir::State::Lists={}", apt.join("lists").display()))
            .arg("-oDir::Cache::pkgcache=")
            .arg("-oDir::Cache::srcpkgcache=")
            .arg("-oAPT::Sandbox::User=root");
    };
    let mut update = Command::new("apt-get");
    options(&mut update);
    run_in(update.arg("update"), work)?;
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    let mut source = Command::new("apt-get");
    options(&mut source);
    run_in(source.args(["source", "kubernetes"]), &src)?;
    let tree = src.join(format!("kubernetes-{DEBIAN_UPSTREAM}"));
    if !tree.join("vendor").is_dir() {
        bail!("apt-get source kubernetes did not unpack {} (has Debian moved to another upstream version?)", tree.display());
    }
    Ok(tree)
}

/// Vendored reflect2 v1.0.1 crashes under Go 1.18+: v1.0.2 in its place, and in go.mod and
/// vendor/modules.txt (checked with `-mod=vendor`).
fn replace_reflect2(tree: &Path) -> Result<()> {
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    std::fs::remove_dir_all(&vendored).with_context(|| format!("remove {}", vendored.display()))?;
    run_in(Command::new("cp").arg("-r").arg(REFLECT2).arg(&vendored), tree)?;
    for file in ["go.mod", "vendor/modules.txt"] {
        let path = tree.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let old = "github.com/modern-go/reflect2 v1.0.1";
        ensure!(text.contains(old), "{} does not pin reflect2 v1.0.1", path.display());
        std::fs::write(&path, text.replace(old, "github.com/modern-go/reflect2 v1.0.2"))?;
    }
    Ok(())
}

fn run_in(cmd: &mut Command, dir: &Path) -> Result<()> {
    let status = cmd.current_dir(dir).status().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}
