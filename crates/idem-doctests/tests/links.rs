//! Every relative link of the workspace's Markdown (README, CONTRIBUTING, CHANGELOG, the
//! guides under `docs/`, the crates' READMEs) points at a file or directory that exists,
//! and every `#anchor` at a heading of the target file, with anchors made the way GitHub
//! makes them. Links to other sites are not followed.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Files another branch adds. While one is missing, links to it are not checked; once
/// it exists they are, like any other. Remove an entry when its file has landed.
const PENDING: &[&str] = &[];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    for dir in ["docs", "docs/grafana"] {
        files.extend(md_in(&root.join(dir)));
    }
    if let Ok(crates) = fs::read_dir(root.join("crates")) {
        for c in crates.flatten() {
            files.extend(md_in(&c.path()));
        }
    }
    files.retain(|f| f.is_file());
    files
}

fn md_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect()
}

/// The lines of `text` outside fenced code blocks, with inline code spans removed.
fn prose_lines(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop `code spans`: every other backtick-separated piece.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join(" ");
        out.push(prose);
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (except `-` and `_`),
/// each space a hyphen; repeated headings get `-1`, `-2`, ...
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#').trim();
        let base: String = heading
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut slug = base.clone();
        let mut n = 0;
        while seen.contains(&slug) {
            n += 1;
            slug = format!("{base}-{n}");
        }
        seen.insert(slug);
    }
    seen
}

/// The targets of the inline links `[text](target)` of a prose line.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                targets.push(after[..j].trim().to_owned());
                rest = &after[j + 1..];
            }
            None => break,
        }
    }
    targets
}

#[test]
fn every_relative_link_resolves() {
    let root = root();
    let files = markdown_files(&root);
    assert!(
        files.iter().any(|f| f.ends_with("README.md")),
        "no Markdown found under {}",
        root.display()
    );
    let mut broken = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap_or_default();
        let dir = file.parent().unwrap_or(&root);
        for line in prose_lines(&text) {
            for target in link_targets(&line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                let shown = format!(
                    "{}: ({target})",
                    file.strip_prefix(&root).unwrap_or(file).display()
                );
                if !resolved.exists() {
                    let pending = PENDING.iter().any(|p| resolved == root.join(p));
                    if !pending {
                        broken.push(format!("{shown}: no such file"));
                    }
                    continue;
                }
                if let Some(anchor) = anchor {
                    if resolved.extension().is_some_and(|x| x == "md") {
                        let target_text = fs::read_to_string(&resolved).unwrap_or_default();
                        if !anchors(&target_text).contains(anchor) {
                            broken.push(format!("{shown}: no heading with this anchor"));
                        }
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_follow_github() {
    let a = anchors("# Quick path 2: RabbitMQ + Redis\n## `idem dlq`, the CLI\n# Twice\n# Twice\n");
    assert!(a.contains("quick-path-2-rabbitmq--redis"), "{a:?}");
    assert!(a.contains("idem-dlq-the-cli"), "{a:?}");
    assert!(a.contains("twice") && a.contains("twice-1"), "{a:?}");
}
