use loco_rs::cli;
use migration::Migrator;
use tollgate::app::App;

/// `cargo loco task key:create email=a@b.c calls=100`: Loco's parser wants `key:value`; the
/// `key=value` form (Django-style, as documented) is rewritten and the CLI re-run with it.
fn rewrite_task_args(args: &[String]) -> Option<Vec<String>> {
    let task_at = args.iter().position(|a| a == "task")?;
    let mut changed = false;
    let rewritten = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if i > task_at + 1 && !a.starts_with('-') {
                if let Some((k, v)) = a.split_once('=') {
                    if !k.contains(':') {
                        changed = true;
                        return format!("{k}:{v}");
                    }
                }
            }
            a.clone()
        })
        .collect();
    changed.then_some(rewritten)
}

/// mimalloc instead of glibc's malloc: fewer cycles per request on the allocation-heavy request
/// path (BENCHMARKS.md, key check).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
#[allow(
    clippy::result_large_err,
    reason = "loco_rs::Error is what Loco's CLI returns; its size is not ours to change"
)]
async fn main() -> loco_rs::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(rewritten) = rewrite_task_args(&args) {
        // Replace this process (same pid), so signals from systemd or a supervisor reach the
        // task itself, e.g. SIGTERM for a worker's graceful stop.
        let err = std::os::unix::process::CommandExt::exec(
            std::process::Command::new(std::env::current_exe()?).args(&rewritten[1..]),
        );
        return Err(err.into());
    }
    cli::main::<App, Migrator>().await
}
