//! `deploy/` stays valid and in step with the code: files parse, every metric a dashboard or
//! alert uses exists, and the systemd unit passes `systemd-analyze verify` where available.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &str) -> String {
    std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// `contrail_*` metric names used in a text (histogram suffixes folded to the base name).
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("contrail_") {
        let start = i + at;
        let end = start + text[start..].bytes().take_while(|c| c.is_ascii_alphanumeric() || *c == b'_').count();
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            let name = &text[start..end];
            out.push(name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count").to_string());
        }
        i = end;
    }
    out
}

#[test]
fn dashboards_and_alerts_parse_and_use_real_metrics() {
    let exported = contrail::metrics::Metrics::new().render();
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/contrail-dashboard.json")).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 8);
    let mut used = metric_names(&read("deploy/grafana/contrail-dashboard.json"));
    for f in [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/docker-compose.yml",
        "deploy/docker-compose.replicas.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/contrail.yml",
    ] {
        let _: serde_yaml::Value = serde_yaml::from_str(&read(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let alerts: serde_yaml::Value = serde_yaml::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    assert!(alerts["groups"][0]["rules"].as_sequence().unwrap().len() >= 4);
    used.extend(metric_names(&read("deploy/prometheus/alerts.yml")));
    assert!(!used.is_empty());
    for name in used {
        assert!(
            exported.contains(&format!("\n{name}")) || exported.contains(&format!("# TYPE {name} ")),
            "{name} is not a metric Contrail exports"
        );
    }
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/contrail.service");
    assert!(unit.contains("Type=notify") && unit.contains("StateDirectory=contrail"));
    // A long log recovery is not killed at systemd's default 90 s; a bad configuration is not
    // restarted in a loop.
    assert!(unit.contains("TimeoutStartSec=15min") && unit.contains("RestartPreventExitStatus=2"));
    let Ok(out) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIP systemd_unit_verifies: systemd-analyze is not installed");
        return;
    };
    if !out.status.success() {
        eprintln!("SKIP systemd_unit_verifies: systemd-analyze does not run here");
        return;
    }
    // verify wants the ExecStart binary to exist: point it at the one cargo built.
    let dir = tempfile::tempdir().unwrap();
    let patched = unit.replace("/usr/local/bin/contrail", env!("CARGO_BIN_EXE_contrail"));
    let path = dir.path().join("contrail.service");
    std::fs::write(&path, patched).unwrap();
    let out = std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{err}");
}

#[test]
fn dockerfile_has_what_operators_expect() {
    let d = read("deploy/Dockerfile");
    for needle in [
        "FROM rust",
        "AS build",
        "FROM debian",
        "USER contrail",
        "VOLUME [\"/data\"]",
        "EXPOSE 6008 6009",
        "HEALTHCHECK",
        "libclang",
    ] {
        assert!(d.contains(needle), "Dockerfile lacks {needle}");
    }
}

/// The image's build stage copies a whole workspace: cargo loads every member, path dependency
/// and declared target, and the lock file resolves, from what the Dockerfile COPYs and nothing
/// else. (It once copied neither `core/` nor `client/`, and `docker build` could not start.)
#[test]
fn dockerfile_copies_a_workspace_cargo_can_load() {
    let d = read("deploy/Dockerfile");
    let build_stage =
        d.split("\nFROM ").find(|stage| stage.lines().next().unwrap_or("").ends_with("AS build")).unwrap();
    let context = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for line in build_stage.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        let (dest, sources) = words.split_last().expect("COPY has a destination");
        for src in sources {
            let from = root().join(src);
            let to = if dest.ends_with('/') { context.path().join(dest).join(src) } else { context.path().join(dest) };
            copy_tree(&from, &to);
            copied += 1;
        }
    }
    assert!(copied >= 3, "no COPY lines found in the build stage");
    // The context is the repository: without this, `docker build` sends the build output too.
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target/"), ".dockerignore must leave out target/");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1", "--manifest-path"])
        .arg(context.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot load the workspace the Dockerfile copies:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies a file, or a directory and everything under it.
fn copy_tree(from: &Path, to: &Path) {
    let meta = std::fs::metadata(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    if meta.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Every Contrail in the compose files may open a socket per subscriber (10,000 by default)
/// beside the log's files: a container runtime's soft limit of 1,024 would not do.
#[test]
fn compose_files_give_contrail_room_for_its_sockets() {
    for f in ["deploy/docker-compose.yml", "deploy/docker-compose.replicas.yml"] {
        let c: serde_yaml::Value = serde_yaml::from_str(&read(f)).unwrap();
        let services = c["services"].as_mapping().unwrap();
        let contrails: Vec<_> =
            services.iter().filter(|(_, s)| s["image"].as_str() == Some("contrail:latest")).collect();
        assert!(!contrails.is_empty(), "{f}");
        for (name, s) in contrails {
            for which in ["soft", "hard"] {
                let n = s["ulimits"]["nofile"][which].as_u64().unwrap_or(0);
                assert!(n >= 20_000, "{f}: {name:?} nofile {which} is {n}");
            }
        }
    }
}

/// The replicas' compose file exempts exactly the replicas from their upstreams' per-IP limits:
/// every exempt entry is one service's fixed address, never a network (clients reaching a
/// published port can arrive from the network's gateway).
#[test]
fn replica_compose_exempts_only_the_replicas() {
    let c: serde_yaml::Value = serde_yaml::from_str(&read("deploy/docker-compose.replicas.yml")).unwrap();
    let services = c["services"].as_mapping().unwrap();
    let addresses: Vec<&str> =
        services.values().filter_map(|s| s["networks"]["contrail"]["ipv4_address"].as_str()).collect();
    assert_eq!(addresses.len(), services.len(), "every service has a fixed address");
    let mut exempt = 0;
    for (name, s) in services {
        let Some(list) = s["environment"]["CONTRAIL_UNLIMITED_CLIENTS"].as_str() else { continue };
        for entry in list.split(',') {
            let (ip, prefix) = entry.split_once('/').unwrap_or((entry, "32"));
            assert_eq!(prefix, "32", "{name:?} exempts a whole network: {entry}");
            assert!(addresses.contains(&ip), "{name:?} exempts {ip}, which is no service's address");
            exempt += 1;
        }
    }
    assert!(exempt >= 2, "the primary and the first replica exempt their replicas");
}
