//! Unit tests of the validation rules: each rule, its located message.

use super::*;

fn issues(yaml: &str) -> Vec<Issue> {
    let config: Config = serde_yaml::from_str(yaml).expect("test YAML parses");
    validate(&config).0
}

fn paths(yaml: &str) -> Vec<String> {
    issues(yaml).into_iter().map(|i| i.path).collect()
}

const TWO: &str = "
proxies:
  - name: a
    listen: 127.0.0.1:1000
    backends: [127.0.0.1:2000]
  - name: b
    listen: 127.0.0.1:1001
    backends: [127.0.0.1:2000]
";

#[test]
fn virtual_hosts_set_max_connections_on_all_or_none() {
    let shared = "
proxies:
  - name: a
    listen: 127.0.0.1:1000
    mode: http
    hosts: [a.example]
    max_connections: 10
    backends: [127.0.0.1:2000]
  - name: b
    listen: 127.0.0.1:1000
    mode: http
    MAXB
    backends: [127.0.0.1:2000]
";
    assert_eq!(paths(&shared.replace("MAXB", "")), ["proxies[1].max_connections"]);
    assert_eq!(
        paths(&shared.replace("MAXB", "max_connections: 5")),
        Vec::<String>::new()
    );
}

#[test]
fn a_valid_config_has_no_issues() {
    assert_eq!(issues(TWO), vec![]);
}

#[test]
fn duplicate_names_and_listeners() {
    let yaml = TWO.replace("name: b", "name: a").replace("1001", "1000");
    assert_eq!(paths(&yaml), ["proxies[1].name", "proxies[1].listen"]);
}

#[test]
fn every_problem_of_a_proxy_is_reported() {
    let yaml = "
proxies:
  - name: 'bad name'
    listen: 127.0.0.1:1
    connect_timeout: 0s
    hosts: [x.example]
    backends: []
    health_check: {timeout: 5s, interval: 1s, rise: 0, fall: 0}
";
    assert_eq!(
        paths(yaml),
        [
            "proxies[0].name",
            "proxies[0].backends",
            "proxies[0].connect_timeout",
            "proxies[0].hosts",
            "proxies[0].health_check.timeout",
            "proxies[0].health_check.rise",
            "proxies[0].health_check.fall",
        ]
    );
}

#[test]
fn backends_are_unique_weighted_and_not_port_zero() {
    let yaml = "
proxies:
  - name: a
    listen: 127.0.0.1:1
    backends: [127.0.0.1:2, 'tcp://127.0.0.1:2', 127.0.0.1:0, {address: 'unix:/x', weight: 0}]
";
    assert_eq!(
        paths(yaml),
        [
            "proxies[0].backends[1]",
            "proxies[0].backends[2]",
            "proxies[0].backends[3].weight"
        ]
    );
}

#[test]
fn http_proxies_share_a_listener_by_disjoint_hosts() {
    let shared = "
proxies:
  - {name: a, mode: http, listen: 127.0.0.1:1, hosts: [a.example], backends: [127.0.0.1:2]}
  - {name: b, mode: http, listen: 127.0.0.1:1, hosts: ['*.b.example'], backends: [127.0.0.1:2]}
  - {name: rest, mode: http, listen: 127.0.0.1:1, backends: [127.0.0.1:2]}
";
    assert_eq!(issues(shared), vec![]);
    let overlap = shared.replace("*.b.example", "A.example");
    assert!(issues(&overlap)[0].message.to_lowercase().contains("a.example"));
    let tcp = shared.replace("name: a, mode: http", "name: a");
    assert_eq!(
        paths(&tcp),
        ["proxies[0].hosts", "proxies[1].listen", "proxies[2].listen"]
    );
}

#[test]
fn request_timeout_is_for_mode_http_more_than_zero_and_shared_alike() {
    let http = "
proxies:
  - {name: a, mode: http, listen: 127.0.0.1:1, request_timeout: 2s, backends: [127.0.0.1:2]}
";
    assert_eq!(issues(http), vec![]);
    assert_eq!(
        paths(&http.replace("mode: http, ", "")),
        ["proxies[0].request_timeout"]
    );
    assert_eq!(paths(&http.replace("2s", "0s")), ["proxies[0].request_timeout"]);
    let shared = "
proxies:
  - {name: a, mode: http, listen: 127.0.0.1:1, hosts: [a.example], backends: [127.0.0.1:2]}
  - {name: b, mode: http, listen: 127.0.0.1:1, request_timeout: 10s, backends: [127.0.0.1:2]}
";
    assert_eq!(issues(shared), vec![], "10s is the default");
    let differing = shared.replace("10s", "3s");
    assert!(issues(&differing)[0].message.contains("request_timeout"));
}

#[test]
fn control_beyond_loopback_needs_a_token() {
    let yaml = "control: {listen: 'tcp://0.0.0.0:9'}";
    assert_eq!(paths(yaml), ["control.token"]);
    assert_eq!(
        issues("control: {listen: 'tcp://0.0.0.0:9', token: s3cret}"),
        vec![]
    );
    assert_eq!(issues("control: {listen: 'tcp://127.0.0.1:9'}"), vec![]);
}

#[test]
fn blank_tokens_and_endless_durations_are_refused() {
    assert_eq!(paths("control: {token: '   '}"), ["control.token"]);
    assert_eq!(paths("control: {token: ''}"), ["control.token"]);
    assert_eq!(paths("control: {token: ' x'}"), ["control.token"]);
    let yaml = "
stats: {interval: 25h}
shutdown: {grace_period: 24h}
proxies:
  - name: a
    listen: 127.0.0.1:1
    connect_timeout: 2h
    idle_timeout: 99999999999h
    pause: {max_duration: 7d}
    backends: [127.0.0.1:2]
";
    assert_eq!(
        paths(yaml),
        [
            "stats.interval",
            "proxies[0].connect_timeout",
            "proxies[0].idle_timeout"
        ]
    );
}

#[test]
fn missing_tls_files_are_named() {
    let yaml = "
proxies:
  - name: a
    listen: 127.0.0.1:1
    tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}
    backends: [127.0.0.1:2]
";
    let found = issues(yaml);
    assert_eq!(found.len(), 1);
    assert!(found[0].message.contains("/nonexistent/c.pem"));
}

#[test]
fn the_access_file_is_an_absolute_path() {
    assert_eq!(
        paths("log: {access: true, access_file: logs/access.log}"),
        ["log.access_file"]
    );
    let relative = &issues("log: {access_file: access.log}")[0];
    assert!(
        relative
            .message
            .contains("\"access.log\" must be an absolute path"),
        "{}",
        relative.message
    );
    assert!(
        paths("log: {access: true, access_file: /var/log/interlude/access.log, format: json}").is_empty()
    );
    assert!(serde_yaml::from_str::<Config>("log: {format: xml}").is_err());
}

#[test]
fn accept_proxy_needs_trusted_proxies_on_tcp_and_none_on_unix() {
    let yaml = "
proxies:
  - name: a
    listen: LISTEN
    ACCEPT
    TRUSTED
    backends: [127.0.0.1:2000]
";
    let with = |listen: &str, accept: &str, trusted: &str| {
        paths(
            &yaml
                .replace("LISTEN", listen)
                .replace("ACCEPT", accept)
                .replace("TRUSTED", trusted),
        )
    };
    let none = Vec::<String>::new();
    assert_eq!(
        with("127.0.0.1:1", "accept_proxy: true", ""),
        ["proxies[0].trusted_proxies"]
    );
    assert_eq!(
        with(
            "127.0.0.1:1",
            "accept_proxy: true",
            "trusted_proxies: [127.0.0.1]"
        ),
        none
    );
    assert_eq!(
        with("127.0.0.1:1", "", "trusted_proxies: [127.0.0.1]"),
        ["proxies[0].trusted_proxies"]
    );
    assert_eq!(with("unix:/tmp/x.sock", "accept_proxy: true", ""), none);
    assert_eq!(
        with(
            "unix:/tmp/x.sock",
            "accept_proxy: true",
            "trusted_proxies: [127.0.0.1]"
        ),
        ["proxies[0].trusted_proxies"]
    );
}

#[test]
fn proxies_sharing_a_listener_agree_on_accept_proxy() {
    let yaml = "
proxies:
  - name: a
    listen: 127.0.0.1:1000
    mode: http
    hosts: [a.example]
    accept_proxy: true
    trusted_proxies: [127.0.0.1]
    backends: [127.0.0.1:2000]
  - name: b
    listen: 127.0.0.1:1000
    mode: http
    hosts: [b.example]
    B
    backends: [127.0.0.1:2000]
";
    assert_eq!(paths(&yaml.replace("B", "")), ["proxies[1].listen"]);
    assert_eq!(
        paths(&yaml.replace("B", "accept_proxy: true\n    trusted_proxies: [127.0.0.1]")),
        Vec::<String>::new()
    );
}
