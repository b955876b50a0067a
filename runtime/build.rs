//! Names the commit Tally is built from (`tally_runtime::COMMIT`), for `tally
//! --version`, the services' start log and `tally_build_info`: upgrade and rollback rules are stated per build,
//! so an operator must be able to tell which one runs. `TALLY_COMMIT` when set (a
//! Docker build, whose context has no `.git`), else git's; `unknown` without either.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TALLY_COMMIT");
    let commit = std::env::var("TALLY_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TALLY_COMMIT={}", commit.trim());
}

fn git_commit() -> Option<String> {
    let output = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    // Built again when HEAD moves: a new commit on the branch, or another branch. Only
    // files that exist are named, or cargo would rerun this on every build.
    let git_dir = Command::new("git")
        .args(["rev-parse", "--absolute-git-dir"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())?;
    let git_dir = Path::new(git_dir.trim());
    let head = git_dir.join("HEAD");
    let mut watched = vec![head.clone(), git_dir.join("packed-refs")];
    if let Some(branch) = std::fs::read_to_string(&head)
        .ok()
        .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
    {
        watched.push(git_dir.join(branch));
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    String::from_utf8(output.stdout).ok()
}
