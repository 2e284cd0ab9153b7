//! Which of llama.cpp's CPU kernels this process runs.
//!
//! Built with the `cpu-variants` feature (the default), llama.cpp's CPU backend exists once per
//! instruction-set variant (`libggml-cpu-haswell.so`, `-skylakex`, `-zen4`, …), as in llama.cpp's
//! own releases. ggml scores every variant against the running CPU and loads the best, so one
//! binary uses AVX-512 where the machine has it and still starts where it has only SSE. This
//! module finds the variants, has ggml load them, and says which one it chose.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use serde::Serialize;

/// Environment variable naming the directory that holds the backend modules, for a deployment
/// that keeps them somewhere other than `backends/` beside the binary.
pub const BACKENDS_DIR_ENV: &str = "TOLLGATE_BACKENDS_DIR";

/// The CPU backend llama.cpp runs on in this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuBackend {
    /// The loaded module's file name (`libggml-cpu-zen4.so`); `None` in a build without
    /// `cpu-variants`, where the kernels are linked in.
    pub variant: Option<String>,
    /// The instruction-set features its kernels were compiled for, as ggml names them
    /// (`AVX2`, `AVX512`, …; only those that are on).
    pub features: Vec<String>,
}

static CHOSEN: OnceLock<CpuBackend> = OnceLock::new();

/// Where the backend modules are looked for: `$TOLLGATE_BACKENDS_DIR`, else `backends/` beside
/// the executable (a deployed copy), else the directory the build installed them in.
#[must_use]
pub fn backends_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(BACKENDS_DIR_ENV) {
        return Some(PathBuf::from(dir));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("backends")));
    if let Some(beside) = beside.filter(|dir| has_cpu_module(dir)) {
        return Some(beside);
    }
    built_dir()
}

#[cfg(feature = "cpu-variants")]
fn built_dir() -> Option<PathBuf> {
    llama_cpp_sys_2::BACKENDS_DIR.map(PathBuf::from)
}

#[cfg(not(feature = "cpu-variants"))]
fn built_dir() -> Option<PathBuf> {
    None
}

/// Whether `dir` holds at least one CPU backend module.
fn has_cpu_module(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|entry| is_cpu_module(&entry.file_name().to_string_lossy()))
    })
}

fn is_cpu_module(file_name: &str) -> bool {
    file_name.starts_with("libggml-cpu-") && file_name.ends_with(".so")
        || file_name.starts_with("ggml-cpu-") && file_name.ends_with(".dll")
}

/// Has ggml load the best backend of each kind (the CPU variant among them) from
/// [`backends_dir`]. Called once, before llama.cpp's backend is initialised.
///
/// # Errors
/// When no directory holds CPU modules, or none of them can run on this CPU.
#[cfg(feature = "cpu-variants")]
pub(super) fn load_backends() -> Result<(), String> {
    let dir = backends_dir()
        .filter(|dir| has_cpu_module(dir))
        .ok_or_else(|| {
            format!(
                "no llama.cpp CPU backend (libggml-cpu-*.so) found: copy the build's backends/ \
                 directory beside the binary or set {BACKENDS_DIR_ENV}"
            )
        })?;
    let path = std::ffi::CString::new(dir.to_string_lossy().as_bytes())
        .map_err(|_| format!("{BACKENDS_DIR_ENV} contains a NUL byte"))?;
    // SAFETY: a valid C string; ggml only reads it.
    unsafe { llama_cpp_sys_2::ggml_backend_load_all_from_path(path.as_ptr()) };
    let chosen = inspect().ok_or_else(|| {
        format!(
            "none of the llama.cpp CPU backends in {} can run on this CPU",
            dir.display()
        )
    })?;
    tracing::info!(
        variant = chosen.variant.as_deref().unwrap_or("built in"),
        features = %chosen.features.join(" "),
        dir = %dir.display(),
        "llama.cpp CPU backend chosen"
    );
    let _ = CHOSEN.set(chosen);
    Ok(())
}

#[cfg(not(feature = "cpu-variants"))]
pub(super) fn load_backends() -> Result<(), String> {
    if let Some(chosen) = inspect() {
        let _ = CHOSEN.set(chosen);
    }
    Ok(())
}

/// The CPU backend this process runs on, once the llama.cpp backend is initialised
/// ([`super::tokenizer::backend`]); `None` before.
#[must_use]
pub fn chosen() -> Option<&'static CpuBackend> {
    CHOSEN.get()
}

/// Reads the registered CPU backend's features from ggml and the loaded module's name from the
/// process's memory map. `None` when no CPU backend is registered.
fn inspect() -> Option<CpuBackend> {
    // SAFETY: a static C string; the registry lookup has no other precondition.
    let reg = unsafe { llama_cpp_sys_2::ggml_backend_reg_by_name(c"CPU".as_ptr()) };
    if reg.is_null() {
        return None;
    }
    Some(CpuBackend {
        variant: loaded_module(),
        features: features(reg),
    })
}

/// The features a backend reports through its optional `ggml_backend_get_features` entry point:
/// a list of name/value pairs ended by a null name.
fn features(reg: llama_cpp_sys_2::ggml_backend_reg_t) -> Vec<String> {
    type GetFeatures = unsafe extern "C" fn(
        llama_cpp_sys_2::ggml_backend_reg_t,
    ) -> *const llama_cpp_sys_2::ggml_backend_feature;
    // SAFETY: `reg` is a registered backend; the name is a static C string.
    let proc = unsafe {
        llama_cpp_sys_2::ggml_backend_reg_get_proc_address(
            reg,
            c"ggml_backend_get_features".as_ptr(),
        )
    };
    if proc.is_null() {
        return Vec::new();
    }
    // SAFETY: ggml documents this entry point's signature as `ggml_backend_get_features_t`.
    let get: GetFeatures = unsafe { std::mem::transmute(proc) };
    // SAFETY: called with its own registry entry; it returns a static array.
    let mut item = unsafe { get(reg) };
    let mut on = Vec::new();
    // The list is short (a few dozen entries); the bound only guards a missing terminator.
    for _ in 0..256 {
        if item.is_null() {
            break;
        }
        // SAFETY: `item` points into the static array, which ends with a null name.
        let feature = unsafe { &*item };
        if feature.name.is_null() {
            break;
        }
        // SAFETY: both are NUL-terminated static strings set by ggml.
        let (name, value) = unsafe {
            (
                std::ffi::CStr::from_ptr(feature.name).to_string_lossy(),
                std::ffi::CStr::from_ptr(feature.value).to_string_lossy(),
            )
        };
        if value == "1" {
            on.push(name.into_owned());
        }
        // SAFETY: not past the terminator, checked above.
        item = unsafe { item.add(1) };
    }
    on
}

/// The file name of the CPU backend module mapped into this process (ggml keeps exactly one
/// loaded: the best-scoring variant), read from `/proc/self/maps`.
fn loaded_module() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.rsplit('/').next())
        .find(|name| is_cpu_module(name))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_of_every_platform_are_recognised_and_nothing_else() {
        assert!(is_cpu_module("libggml-cpu-zen4.so"));
        assert!(is_cpu_module("ggml-cpu-haswell.dll"));
        assert!(!is_cpu_module("libggml-cuda.so"));
        assert!(!is_cpu_module("libggml-cpu-zen4.so.bak"));
    }

    /// The whole mechanism, on this machine: the best variant for this CPU is loaded (one
    /// compiled for AVX-512 where the CPU has it, AVX2 where it has that), not a portable one.
    #[cfg(all(feature = "cpu-variants", target_arch = "x86_64"))]
    #[test]
    fn the_variant_chosen_uses_the_vector_units_this_cpu_has() {
        super::super::tokenizer::backend().expect("llama.cpp backend");
        let chosen = chosen().expect("a CPU backend was chosen");
        let variant = chosen.variant.as_deref().expect("loaded from a module");
        assert!(variant.starts_with("libggml-cpu-"), "{variant}");
        let has = |f: &str| chosen.features.iter().any(|x| x == f);
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(has("AVX512"), "{variant}: {:?}", chosen.features);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert!(
                has("AVX2") && has("FMA"),
                "{variant}: {:?}",
                chosen.features
            );
        }
    }
}
