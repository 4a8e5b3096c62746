use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "policy-ebpf")
        .ok_or_else(|| anyhow!("policy-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("policy-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let object = std::path::Path::new(&out_dir).join("policy-ebpf");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Host-only builds (lint, unit tests of the compiler) still need the file to embed;
        // loading an empty object fails at run time with a clear error.
        if !object.exists() {
            std::fs::write(&object, b"").context("write placeholder eBPF object")?;
        }
    }
    // The classifier is built from policy-common too; aya-build watches only policy-ebpf.
    let common = std::path::Path::new(&root_dir).join("../policy-common/src");
    println!("cargo:rerun-if-changed={}", common.display());
    aya_build::build_ebpf(
        [Package { name: "policy-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::default(),
    )
}
