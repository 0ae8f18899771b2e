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
