//! The difference between the desired config and what runs, as data: a
//! pure function from (desired proxies, running proxies) to a `Plan`.
//! Applying the plan is `reload.rs`'s job; this file decides only *what*.
//!
//! Proxies are matched by name; listening sockets by address, apart from
//! the proxies: a socket stays open as long as some proxy listens there,
//! whichever proxy that is. So a proxy renamed on the same address, a
//! virtual host joining or leaving a shared listener, or two proxies
//! swapping addresses never close a socket that stays in use, and the
//! kernel keeps queueing connections throughout.

use crate::config::{Address, ProxyConfig};

/// What runs now, as far as planning needs to know.
pub struct Running<'a> {
    pub name: &'a str,
    pub config: &'a ProxyConfig,
    pub key: &'a ListenKey,
}

/// Identifies a listening socket across reloads: its address, except that
/// an ephemeral port (`:0`) names no particular socket, so each proxy on
/// one has its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenKey {
    Address(Address),
    Ephemeral { proxy: String, address: Address },
}

impl ListenKey {
    pub fn of(proxy: &ProxyConfig) -> ListenKey {
        if proxy.listen.port() == Some(0) {
            ListenKey::Ephemeral {
                proxy: proxy.name.clone(),
                address: proxy.listen.clone(),
            }
        } else {
            ListenKey::Address(proxy.listen.clone())
        }
    }

    /// The address to bind.
    pub fn address(&self) -> &Address {
        match self {
            ListenKey::Address(address) | ListenKey::Ephemeral { address, .. } => address,
        }
    }

    /// The proxy a port 0 is bound for (each gets a socket of its own).
    pub fn owner(&self) -> Option<&str> {
        match self {
            ListenKey::Address(_) => None,
            ListenKey::Ephemeral { proxy, .. } => Some(proxy),
        }
    }
}

#[derive(Debug)]
pub struct Plan {
    /// One step per desired proxy, in config order.
    pub steps: Vec<Step>,
    /// Running proxies the config no longer has.
    pub remove: Vec<String>,
    /// Sockets to bind (before anything changes: a failure rejects the reload).
    pub bind: Vec<ListenKey>,
    /// Sockets no desired proxy listens on any more (closed last).
    pub close: Vec<ListenKey>,
}

/// One desired proxy and what to do for it; it carries its config entry
/// and listen key, so applying it needs nothing else from the file.
#[derive(Debug)]
pub struct Step {
    pub action: Action,
    pub wanted: ProxyConfig,
    pub key: ListenKey,
}

impl Step {
    pub fn name(&self) -> &str {
        &self.wanted.name
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Same name, same config: nothing to do.
    Unchanged,
    /// Same name and address, other settings: applied to new connections.
    Update,
    /// Same name, another address (and perhaps other settings).
    Move,
    /// A new name.
    Add,
}

impl Plan {
    /// A one-line account for the log: "added a; moved b; updated c; removed d".
    pub fn summary(&self) -> String {
        let names = |pick: &dyn Fn(&Action) -> bool| -> Vec<&str> {
            self.steps
                .iter()
                .filter(|s| pick(&s.action))
                .map(Step::name)
                .collect()
        };
        let parts = [
            ("added", names(&|a| *a == Action::Add)),
            ("moved", names(&|a| *a == Action::Move)),
            ("updated", names(&|a| *a == Action::Update)),
            ("removed", self.remove.iter().map(String::as_str).collect()),
        ];
        let described: Vec<String> = parts
            .iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(verb, names)| format!("{verb} {}", names.join(", ")))
            .collect();
        if described.is_empty() {
            "no changes".into()
        } else {
            described.join("; ")
        }
    }
}

/// The plan from what runs to `desired` (in config order).
pub fn plan(desired: Vec<ProxyConfig>, running: &[Running<'_>]) -> Plan {
    let by_name = |name: &str| running.iter().find(|r| r.name == name);
    let remove = running
        .iter()
        .filter(|r| !desired.iter().any(|d| d.name == r.name))
        .map(|r| r.name.to_string())
        .collect();
    let steps: Vec<Step> = desired
        .into_iter()
        .map(|wanted| {
            let key = ListenKey::of(&wanted);
            let action = match by_name(&wanted.name) {
                Some(current) if *current.config == wanted => Action::Unchanged,
                Some(current) if *current.key == key => Action::Update,
                Some(_) => Action::Move,
                None => Action::Add,
            };
            Step { action, wanted, key }
        })
        .collect();
    let wanted_keys = unique(steps.iter().map(|s| s.key.clone()));
    let running_keys = unique(running.iter().map(|r| r.key.clone()));
    Plan {
        steps,
        remove,
        bind: wanted_keys
            .iter()
            .filter(|k| !running_keys.contains(k))
            .cloned()
            .collect(),
        close: running_keys
            .into_iter()
            .filter(|k| !wanted_keys.contains(k))
            .collect(),
    }
}

/// Keys in first-seen order, each once.
fn unique(keys: impl Iterator<Item = ListenKey>) -> Vec<ListenKey> {
    let mut seen = Vec::new();
    for key in keys {
        if !seen.contains(&key) {
            seen.push(key);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn proxies(yaml: &str) -> Vec<ProxyConfig> {
        let config: Config = serde_yaml::from_str(yaml).expect("test YAML");
        config.proxies
    }

    fn plan_between(before: &str, after: &str) -> Plan {
        let before = proxies(before);
        let keys: Vec<ListenKey> = before.iter().map(ListenKey::of).collect();
        let running: Vec<Running> = before
            .iter()
            .zip(&keys)
            .map(|(config, key)| Running {
                name: &config.name,
                config,
                key,
            })
            .collect();
        plan(proxies(after), &running)
    }

    fn step(name: &str, action: Action) -> (String, Action) {
        (name.into(), action)
    }

    /// Each step's proxy and action, to compare with `step`s.
    fn actions(plan: &Plan) -> Vec<(String, Action)> {
        plan.steps
            .iter()
            .map(|s| (s.name().to_string(), s.action))
            .collect()
    }

    fn key(address: &str) -> ListenKey {
        ListenKey::Address(Address::parse(address).unwrap())
    }

    const BASE: &str = "
proxies:
  - {name: web, listen: '127.0.0.1:1', backends: ['127.0.0.1:9']}
  - {name: db, listen: '127.0.0.1:2', backends: ['127.0.0.1:9']}
";

    #[test]
    fn unchanged() {
        let plan = plan_between(BASE, BASE);
        assert!(plan.remove.is_empty() && plan.bind.is_empty() && plan.close.is_empty());
        assert!(plan.steps.iter().all(|s| s.action == Action::Unchanged));
        assert_eq!(plan.summary(), "no changes");
    }

    #[test]
    fn changed_backends_update_in_place() {
        let after = BASE.replace(
            "name: db, listen: '127.0.0.1:2', backends: ['127.0.0.1:9']",
            "name: db, listen: '127.0.0.1:2', backends: ['127.0.0.1:8']",
        );
        let plan = plan_between(BASE, &after);
        assert_eq!(
            actions(&plan),
            [step("web", Action::Unchanged), step("db", Action::Update)]
        );
        assert!(plan.bind.is_empty() && plan.close.is_empty());
        assert_eq!(plan.summary(), "updated db");
    }

    #[test]
    fn added_and_removed() {
        let after = BASE.replace(
            "name: db, listen: '127.0.0.1:2'",
            "name: cache, listen: '127.0.0.1:3'",
        );
        let plan = plan_between(BASE, &after);
        assert_eq!(
            actions(&plan),
            [step("web", Action::Unchanged), step("cache", Action::Add)]
        );
        assert_eq!(plan.remove, ["db"]);
        assert_eq!(plan.bind, [key("127.0.0.1:3")]);
        assert_eq!(plan.close, [key("127.0.0.1:2")]);
        assert_eq!(plan.summary(), "added cache; removed db");
    }

    #[test]
    fn renamed_on_the_same_address_keeps_the_socket() {
        let after = BASE.replace("name: db", "name: database");
        let plan = plan_between(BASE, &after);
        assert_eq!(actions(&plan)[1], step("database", Action::Add));
        assert_eq!(plan.remove, ["db"]);
        assert!(plan.bind.is_empty() && plan.close.is_empty());
    }

    #[test]
    fn moved_address_binds_the_new_and_closes_the_old() {
        let after = BASE.replace("127.0.0.1:2", "127.0.0.1:4");
        let plan = plan_between(BASE, &after);
        assert_eq!(actions(&plan)[1], step("db", Action::Move));
        assert!(plan.remove.is_empty());
        assert_eq!(plan.bind, [key("127.0.0.1:4")]);
        assert_eq!(plan.close, [key("127.0.0.1:2")]);
    }

    #[test]
    fn swapped_addresses_keep_both_sockets() {
        let after = "
proxies:
  - {name: web, listen: '127.0.0.1:2', backends: ['127.0.0.1:9']}
  - {name: db, listen: '127.0.0.1:1', backends: ['127.0.0.1:9']}
";
        let plan = plan_between(BASE, after);
        assert_eq!(
            actions(&plan),
            [step("web", Action::Move), step("db", Action::Move)]
        );
        assert!(plan.bind.is_empty() && plan.close.is_empty());
    }

    #[test]
    fn virtual_hosts_join_and_leave_a_shared_listener() {
        let one = "
proxies:
  - {name: a, mode: http, listen: '127.0.0.1:1', hosts: [a.example], backends: ['127.0.0.1:9']}
";
        let two = format!(
            "{one}  - {{name: b, mode: http, listen: '127.0.0.1:1', hosts: [b.example], backends: ['127.0.0.1:9']}}\n"
        );
        let joined = plan_between(one, &two);
        assert_eq!(actions(&joined)[1], step("b", Action::Add));
        assert!(joined.bind.is_empty() && joined.close.is_empty());
        let left = plan_between(&two, one);
        assert_eq!(left.remove, ["b"]);
        assert!(left.bind.is_empty() && left.close.is_empty());
    }

    #[test]
    fn ephemeral_ports_are_one_socket_per_proxy() {
        let yaml = "
proxies:
  - {name: a, listen: '127.0.0.1:0', backends: ['127.0.0.1:9']}
  - {name: b, listen: '127.0.0.1:0', backends: ['127.0.0.1:9']}
";
        let started = plan_between("proxies: []", yaml);
        assert_eq!(started.bind.len(), 2);
        let renamed = plan_between(yaml, &yaml.replace("name: b", "name: c"));
        assert_eq!(
            renamed.bind.len(),
            1,
            "the renamed proxy's port 0 is a new socket"
        );
        assert_eq!(renamed.close.len(), 1);
    }
}
