//! Names the commit Tally is built from (`tally_runtime::COMMIT`), for `tally
//! --version`, the services' start log and `tally_build_info`: upgrade and rollback
//! rules are stated per build, so an operator must be able to tell which one runs.
//! `TALLY_COMMIT` when set (a Docker build, whose context has no `.git`), else git's;
//! `unknown` without either.

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

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8(output.stdout).ok())?
}

fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Built again when HEAD moves: HEAD itself (another branch), its log (every commit,
    // in a worktree too), and the branches wherever git keeps them (loose or packed, in
    // the common directory a worktree shares). Only paths that exist are named, or
    // cargo would run this on every build.
    let mut watched = Vec::new();
    for path in ["HEAD", "logs/HEAD"] {
        watched.extend(git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            path,
        ]));
    }
    if let Some(common) = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]) {
        let common = std::path::Path::new(common.trim());
        for path in ["refs/heads", "packed-refs"] {
            watched.push(common.join(path).display().to_string());
        }
    }
    for path in watched.iter().map(|p| p.trim()) {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
