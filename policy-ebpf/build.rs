use which::which;

/// Building this crate needs bpf-linker; say so clearly instead of failing deep in rustc.
/// (Cargo also rebuilds this crate when the linker changes.)
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().expect("bpf-linker path is UTF-8"));
}
