//! Container images without a registry: a root filesystem assembled from local files, made a
//! one-layer OCI image with umoci, exported by skopeo as a docker-archive under the name the
//! pods ask for, and imported into containerd's `k8s.io` namespace (kubelet's). With
//! `imagePullPolicy: IfNotPresent` (the e2e suite's and the DaemonSet's) nothing is pulled.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::{control::ctr, host::sh, work};

/// The names test/utils/image/manifest.go of v1.20.2 gives: agnhost is `Agnhost` =
/// `{promoterE2eRegistry, "agnhost", "2.21"}` (k8s.gcr.io/e2e-test-images), pause is
/// `{gcRegistry, "pause", "3.2"}` (k8s.gcr.io); the NetworkPolicy cases use only these two.
pub const AGNHOST_IMAGE: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";
pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
/// What the DaemonSet names (`policy-agent:0.1.0`), as containerd normalises it.
pub const AGENT_IMAGE: &str = "docker.io/library/policy-agent:0.1.0";

/// One image: its rootfs directory, entrypoint and default arguments.
struct Image<'a> {
    name: &'a str,
    rootfs: PathBuf,
    entrypoint: &'a str,
    cmd: Option<&'a str>,
}

pub fn import_e2e_images(bin: &Path) -> Result<()> {
    let pause = rootfs("pause")?;
    std::fs::copy(bin.join("pause"), pause.join("pause"))?;
    import(&Image { name: PAUSE_IMAGE, rootfs: pause, entrypoint: "/pause", cmd: None })?;
    // The e2e clients run `/bin/sh -c 'for i in $(seq 1 5); do /agnhost connect ...'`:
    // busybox's applets as symlinks in /bin.
    let agnhost = rootfs("agnhost")?;
    std::fs::copy(bin.join("agnhost"), agnhost.join("agnhost"))?;
    std::fs::create_dir_all(agnhost.join("bin"))?;
    std::fs::create_dir_all(agnhost.join("tmp"))?;
    std::fs::copy("/bin/busybox", agnhost.join("bin/busybox"))?;
    for applet in sh("/bin/busybox", &["--list"])?.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", agnhost.join("bin").join(applet))?;
    }
    import(&Image { name: AGNHOST_IMAGE, rootfs: agnhost, entrypoint: "/agnhost", cmd: None })
}

/// The agent's image from its release binary and the shared libraries `ldd` lists (glibc):
/// the same content as manifests/install/Dockerfile's runtime stage, without `mount`
/// (needed only to mount a bpffs, which the DaemonSet's hostPath provides).
pub fn import_agent_image(agent: &Path) -> Result<()> {
    let root = rootfs("policy-agent")?;
    std::fs::create_dir_all(root.join("usr/local/bin"))?;
    std::fs::create_dir_all(root.join("tmp"))?;
    std::fs::copy(agent, root.join("usr/local/bin/policy-agent")).with_context(|| format!("copy {}", agent.display()))?;
    for lib in shared_libraries(agent)? {
        let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(to.parent().expect("library path has a parent"))?;
        // The resolved file under the name the loader looks for.
        std::fs::copy(&lib, &to).with_context(|| format!("copy {}", lib.display()))?;
    }
    import(&Image { name: AGENT_IMAGE, rootfs: root, entrypoint: "/usr/local/bin/policy-agent", cmd: Some("run") })
}

/// The absolute paths in `ldd`'s answer: `libc.so.6 => /lib/...` and the loader.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = sh("ldd", &[&binary.display().to_string()])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

fn rootfs(name: &str) -> Result<PathBuf> {
    let dir = work("images").join(name).join("rootfs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn import(image: &Image) -> Result<()> {
    let dir = image.rootfs.parent().expect("rootfs has a parent").to_path_buf();
    let layout = dir.join("oci").display().to_string();
    let _ = std::fs::remove_dir_all(&layout);
    let reference = format!("{layout}:latest");
    let rootfs = image.rootfs.display().to_string();
    sh("umoci", &["init", "--layout", &layout])?;
    sh("umoci", &["new", "--image", &reference])?;
    sh("umoci", &["insert", "--image", &reference, &rootfs, "/"])?;
    let entrypoint = format!("--config.entrypoint={}", image.entrypoint);
    let mut config = vec!["config", "--image", &reference, &entrypoint, "--config.env=PATH=/bin:/usr/local/bin:/usr/bin"];
    let cmd = image.cmd.map(|c| format!("--config.cmd={c}"));
    if let Some(cmd) = &cmd {
        config.push(cmd);
    }
    sh("umoci", &config)?;
    let archive = dir.join("image.tar");
    let _ = std::fs::remove_file(&archive);
    sh("skopeo", &["copy", "--quiet", &format!("oci:{reference}"), &format!("docker-archive:{}:{}", archive.display(), image.name)])?;
    ctr(&["images", "import", &archive.display().to_string()])?;
    eprintln!("kube-node: imported image {}", image.name);
    Ok(())
}
