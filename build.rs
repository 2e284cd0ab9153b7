//! Lets the binaries find llama.cpp's shared libraries without `LD_LIBRARY_PATH`.
//!
//! With the `cpu-variants` feature llama.cpp is built as shared libraries (`libllama`, `libggml*`)
//! plus one CPU backend module per instruction-set variant. The binaries get two run paths: the
//! build's own library directory (so a `cargo build` runs as is, never a stale copy) and
//! `$ORIGIN` (so a deployed binary finds the libraries copied beside it).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "freebsd" {
        return;
    }
    // `DEP_LLAMA_BACKENDS_DIR` is `<llama-cpp-sys-2's OUT_DIR>/backends`; the libraries are
    // installed in that OUT_DIR's `lib` (or `lib64`).
    if let Ok(backends) = std::env::var("DEP_LLAMA_BACKENDS_DIR") {
        if let Some(out_dir) = Path::new(&backends).parent() {
            for lib in ["lib", "lib64"] {
                let dir = out_dir.join(lib);
                if dir.is_dir() {
                    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
                    repair_copies(&dir);
                }
            }
        }
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");
}

/// llama-cpp-sys-2 hard-links its `lib*.so` into `target/<profile>/` (`deps/`, `examples/`) for `cargo
/// run`; those are relative symlinks (`libllama.so -> libllama.so.0`) whose targets it does not
/// copy, so they dangle, and its next build (another feature set, a rebuild) fails on them
/// with "File exists". Every name of the library folder is linked there (absolute), so the
/// copies resolve, to this build's libraries.
fn repair_copies(lib_dir: &Path) {
    let Some(profile_dir) = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .and_then(|out| out.ancestors().nth(3).map(Path::to_path_buf))
    else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(lib_dir) else {
        return;
    };
    let names: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| {
            let n = n.to_string_lossy();
            n.starts_with("lib") && n.contains(".so")
        })
        .collect();
    for dir in [
        profile_dir.clone(),
        profile_dir.join("deps"),
        profile_dir.join("examples"),
    ] {
        if !dir.is_dir() {
            continue;
        }
        for name in &names {
            let link = dir.join(name);
            // Only the names the sys crate created (or an earlier run of this), never a file
            // of anyone else's: a dangling or earlier link, or an absent name.
            let ours =
                std::fs::symlink_metadata(&link).map_or(true, |m| m.file_type().is_symlink());
            if ours {
                let _ = std::fs::remove_file(&link);
                #[cfg(unix)]
                let _ = std::os::unix::fs::symlink(lib_dir.join(name), &link);
            }
        }
    }
}
