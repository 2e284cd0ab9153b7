//! Which of llama.cpp's CPU kernels this process runs.
//!
//! Built with the `cpu-variants` feature (the default), llama.cpp's CPU backend exists once per
//! instruction-set variant (`libggml-cpu-haswell.so`, `-skylakex`, `-zen4`, …), as in llama.cpp's
//! own releases. Each variant scores itself against the running CPU and the best one is loaded
//! (but never the AMX one unless asked for: it crashes, see `UNSAFE_VARIANTS`), so one binary
//! uses AVX-512 where the machine has it and still starts where it has only SSE. This module
//! finds the variants, scores them, has ggml load the chosen one, and says which it is.

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

/// Whether `file_name` is a backend module ggml would load from the directory (a CPU variant,
/// or another kind's: `libggml-cuda.so`), not ggml's own base library.
#[cfg_attr(not(feature = "cpu-variants"), allow(dead_code))]
fn is_backend_module(file_name: &str) -> bool {
    let kind = file_name
        .strip_prefix("libggml-")
        .and_then(|k| k.strip_suffix(".so"))
        .or_else(|| {
            file_name
                .strip_prefix("ggml-")
                .and_then(|k| k.strip_suffix(".dll"))
        });
    kind.is_some_and(|k| !k.is_empty() && k != "base")
}

/// Environment variable naming the CPU variant to run (`zen4`, `icelake`, …, or the module's file
/// name), instead of the best-scoring one that is safe to run.
pub const CPU_VARIANT_ENV: &str = "TOLLGATE_CPU_VARIANT";

/// Variants never chosen unless [`CPU_VARIANT_ENV`] names them. `sapphirerapids` is the one
/// with llama.cpp's AMX kernels, and those die with SIGILL on their first tile load when GCC
/// builds them: the tile configuration they set up on the stack is optimised away
/// (ggml-org/llama.cpp#26954), so every AMX-capable Xeon (Sapphire Rapids and later) would
/// lose the whole server at its first prompt. The next best variant (AVX-512 with VNNI and
/// BF16) runs there instead.
#[cfg_attr(not(feature = "cpu-variants"), allow(dead_code))]
const UNSAFE_VARIANTS: &[&str] = &["sapphirerapids"];

/// The variant's own name in a module's file name: `zen4` in `libggml-cpu-zen4.so`.
#[cfg_attr(not(feature = "cpu-variants"), allow(dead_code))]
fn variant_name(file_name: &str) -> &str {
    let stem = file_name
        .strip_suffix(".so")
        .or_else(|| file_name.strip_suffix(".dll"))
        .unwrap_or(file_name);
    stem.strip_prefix("libggml-cpu-")
        .or_else(|| stem.strip_prefix("ggml-cpu-"))
        .unwrap_or(stem)
}

/// Which of the scored CPU modules (file name, ggml's score for this CPU; 0: cannot run) to
/// load: the one `wanted` names, else the best-scoring one not in [`UNSAFE_VARIANTS`].
#[cfg_attr(not(feature = "cpu-variants"), allow(dead_code))]
fn choose<'a>(scored: &'a [(String, i32)], wanted: Option<&str>) -> Result<&'a str, String> {
    if let Some(wanted) = wanted {
        let (name, score) = scored
            .iter()
            .find(|(name, _)| name == wanted || variant_name(name) == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = scored.iter().map(|(n, _)| variant_name(n)).collect();
                format!(
                    "{CPU_VARIANT_ENV}={wanted}: no such CPU variant (there are: {})",
                    known.join(", ")
                )
            })?;
        return if *score > 0 {
            Ok(name)
        } else {
            Err(format!(
                "{CPU_VARIANT_ENV}={wanted}: that variant cannot run on this CPU"
            ))
        };
    }
    scored
        .iter()
        .filter(|(name, score)| *score > 0 && !UNSAFE_VARIANTS.contains(&variant_name(name)))
        // The first of equal scores, as ggml takes it.
        .fold(None::<&(String, i32)>, |best, next| match best {
            Some(b) if b.1 >= next.1 => Some(b),
            _ => Some(next),
        })
        .map(|(name, _)| name.as_str())
        .ok_or_else(|| "none of the llama.cpp CPU backends can run on this CPU".to_string())
}

#[cfg(feature = "cpu-variants")]
/// What ggml's `ggml_backend_score` says of the module at `path` (0 when it cannot be opened
/// or cannot run here); the module is closed again.
fn score(path: &Path) -> i32 {
    type Score = unsafe extern "C" fn() -> std::os::raw::c_int;
    // SAFETY: a ggml backend module; opening it runs only its static initialisers, as ggml's
    // own loader does when it scores the variants.
    let Ok(lib) = (unsafe { libloading::Library::new(path) }) else {
        return 0;
    };
    // SAFETY: every ggml backend module exports this entry point with this signature.
    let f = unsafe { lib.get::<Score>(b"ggml_backend_score\0") };
    // SAFETY: it only reads the CPU's feature flags.
    f.map_or(0, |f| unsafe { f() })
}

/// Has ggml load the CPU variant [`choose`] picks (and any other backend module beside it, a
/// GPU's, as ggml would) from [`backends_dir`]. Called once, before llama.cpp's backend is
/// initialised.
///
/// # Errors
/// When no directory holds CPU modules, none of them can run on this CPU, or
/// [`CPU_VARIANT_ENV`] names one that does not exist or cannot run.
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
    let mut modules: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| is_backend_module(name))
        .collect();
    modules.sort();
    let scored: Vec<(String, i32)> = modules
        .iter()
        .filter(|name| is_cpu_module(name))
        .map(|name| (name.clone(), score(&dir.join(name))))
        .collect();
    let wanted = std::env::var(CPU_VARIANT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let cpu = choose(&scored, wanted.as_deref().map(str::trim))
        .map_err(|e| format!("{e} (in {})", dir.display()))?;
    let others = modules.iter().filter(|name| !is_cpu_module(name));
    let paths = std::iter::once(cpu)
        .chain(others.map(String::as_str))
        .map(|name| dir.join(name))
        // An out-of-tree backend, as ggml's own loader takes it.
        .chain(std::env::var_os("GGML_BACKEND_PATH").map(PathBuf::from));
    for path in paths {
        let path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
        // SAFETY: a valid C string; ggml only reads it. A module that cannot run here (a GPU
        // backend without its GPU) scores 0 and is not registered.
        unsafe { llama_cpp_sys_2::ggml_backend_load(path.as_ptr()) };
    }
    let chosen = inspect().ok_or_else(|| {
        format!(
            "the llama.cpp CPU backend {cpu} in {} did not load",
            dir.display()
        )
    })?;
    let skipped: Vec<&str> = scored
        .iter()
        .filter(|(name, score)| {
            *score > 0 && name != cpu && UNSAFE_VARIANTS.contains(&variant_name(name))
        })
        .map(|(name, _)| variant_name(name))
        .collect();
    tracing::info!(
        variant = chosen.variant.as_deref().unwrap_or("built in"),
        features = %chosen.features.join(" "),
        dir = %dir.display(),
        skipped = %skipped.join(" "),
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

    fn scored(list: &[(&str, i32)]) -> Vec<(String, i32)> {
        list.iter().map(|(n, s)| ((*n).to_string(), *s)).collect()
    }

    /// AMX's variant would take the process down at its first prompt (SIGILL), so the best of
    /// the others runs unless it is named; a named variant must exist and run here.
    #[test]
    fn the_best_safe_variant_is_chosen_and_a_named_one_must_exist_and_run() {
        let on_a_xeon = scored(&[
            ("libggml-cpu-haswell.so", 40),
            ("libggml-cpu-icelake.so", 70),
            ("libggml-cpu-sapphirerapids.so", 90),
            ("libggml-cpu-x64.so", 1),
            ("libggml-cpu-zen4.so", 80),
        ]);
        assert_eq!(choose(&on_a_xeon, None), Ok("libggml-cpu-zen4.so"));
        assert_eq!(
            choose(&on_a_xeon, Some("sapphirerapids")),
            Ok("libggml-cpu-sapphirerapids.so")
        );
        assert_eq!(
            choose(&on_a_xeon, Some("libggml-cpu-icelake.so")),
            Ok("libggml-cpu-icelake.so")
        );
        let unknown = choose(&on_a_xeon, Some("m4")).expect_err("no such variant");
        assert!(
            unknown.contains("zen4") && unknown.contains(CPU_VARIANT_ENV),
            "{unknown}"
        );
        let on_an_old_cpu = scored(&[
            ("libggml-cpu-haswell.so", 40),
            ("libggml-cpu-zen4.so", 0),
            ("libggml-cpu-sse42.so", 10),
        ]);
        assert_eq!(choose(&on_an_old_cpu, None), Ok("libggml-cpu-haswell.so"));
        assert!(choose(&on_an_old_cpu, Some("zen4"))
            .expect_err("cannot run")
            .contains("cannot run"));
        let ties = scored(&[("libggml-cpu-a.so", 5), ("libggml-cpu-b.so", 5)]);
        assert_eq!(choose(&ties, None), Ok("libggml-cpu-a.so"));
        let only_amx = scored(&[("libggml-cpu-sapphirerapids.so", 90)]);
        assert!(choose(&only_amx, None).is_err());
        assert!(choose(&[], None).is_err());
    }

    #[test]
    fn backend_modules_are_told_from_ggmls_base_library() {
        assert!(is_backend_module("libggml-cpu-zen4.so"));
        assert!(is_backend_module("libggml-cuda.so"));
        assert!(is_backend_module("ggml-vulkan.dll"));
        assert!(!is_backend_module("libggml-base.so"));
        assert!(!is_backend_module("libggml.so"));
        assert!(!is_backend_module("libggml-cuda.so.0"));
        assert_eq!(variant_name("libggml-cpu-zen4.so"), "zen4");
        assert_eq!(variant_name("ggml-cpu-haswell.dll"), "haswell");
    }

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
        assert!(
            std::env::var_os(CPU_VARIANT_ENV).is_some()
                || !UNSAFE_VARIANTS.contains(&variant_name(variant)),
            "{variant} chosen without being named"
        );
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
