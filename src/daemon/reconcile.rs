//! The difference between the desired config and what runs, as data: a
//! pure function from (desired proxies, running proxies) to a `Plan`.
//! Applying the plan is `reload.rs`'s job; this file decides only *what*.
//!
//! Proxies are matched by name; listening sockets by address. A socket is
//! never closed and re-bound when its address stays in use: a proxy renamed
//! on the same address takes over the old socket, so the kernel keeps
//! queueing connections throughout and none is refused.

use crate::config::{Address, ProxyConfig};

/// What runs now, as far as planning needs to know.
pub struct Running<'a> {
    pub name: &'a str,
    pub config: &'a ProxyConfig,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// One step per desired proxy, in config order.
    pub steps: Vec<Step>,
    /// Running proxies the config no longer has.
    pub remove: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub action: Action,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Same name, same config: nothing to do.
    Unchanged,
    /// Same name and address, other settings: applied to new connections.
    Update,
    /// Same name, another address: the proxy gets `listener`, then its old
    /// socket closes (unless another proxy takes it over).
    Move { listener: Source },
    /// A new name, served from `listener`.
    Add { listener: Source },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// Bind a fresh socket.
    Bind,
    /// Take the socket the named running proxy listens on (it is being
    /// removed or moved elsewhere).
    TakeOver(String),
}

impl Plan {
    /// Proxies whose socket another proxy takes over (not to be closed).
    pub fn taken_over(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|step| match &step.action {
            Action::Move {
                listener: Source::TakeOver(from),
            }
            | Action::Add {
                listener: Source::TakeOver(from),
            } => Some(from.as_str()),
            _ => None,
        })
    }

    /// A one-line account for the log: "added a; moved b; updated c; removed d".
    pub fn summary(&self) -> String {
        let names = |pick: &dyn Fn(&Action) -> bool| -> Vec<&str> {
            self.steps
                .iter()
                .filter(|s| pick(&s.action))
                .map(|s| s.name.as_str())
                .collect()
        };
        let parts = [
            ("added", names(&|a| matches!(a, Action::Add { .. }))),
            ("moved", names(&|a| matches!(a, Action::Move { .. }))),
            ("updated", names(&|a| matches!(a, Action::Update))),
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

pub fn plan(desired: &[ProxyConfig], running: &[Running<'_>]) -> Plan {
    let by_name = |name: &str| running.iter().find(|r| r.name == name);
    let still_wanted_at =
        |name: &str, listen: &Address| desired.iter().any(|d| d.name == name && &d.listen == listen);
    // The running proxy whose socket at `listen` is free to take: its owner
    // is going away or moving to another address.
    let socket_at = |listen: &Address| {
        if listen.port() == Some(0) {
            return Source::Bind; // an ephemeral port names no particular socket
        }
        running
            .iter()
            .find(|r| &r.config.listen == listen && !still_wanted_at(r.name, listen))
            .map(|r| Source::TakeOver(r.name.to_string()))
            .unwrap_or(Source::Bind)
    };
    let steps = desired
        .iter()
        .map(|wanted| {
            let action = match by_name(&wanted.name) {
                Some(current) if current.config == wanted => Action::Unchanged,
                Some(current) if current.config.listen == wanted.listen => Action::Update,
                Some(_) => Action::Move {
                    listener: socket_at(&wanted.listen),
                },
                None => Action::Add {
                    listener: socket_at(&wanted.listen),
                },
            };
            Step {
                name: wanted.name.clone(),
                action,
            }
        })
        .collect();
    let remove = running
        .iter()
        .filter(|r| !desired.iter().any(|d| d.name == r.name))
        .map(|r| r.name.to_string())
        .collect();
    Plan { steps, remove }
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
        let running: Vec<Running> = before
            .iter()
            .map(|config| Running {
                name: &config.name,
                config,
            })
            .collect();
        plan(&proxies(after), &running)
    }

    fn step(name: &str, action: Action) -> Step {
        Step {
            name: name.into(),
            action,
        }
    }

    const BASE: &str = "
proxies:
  - {name: web, listen: '127.0.0.1:1', backends: ['127.0.0.1:9']}
  - {name: db, listen: '127.0.0.1:2', backends: ['127.0.0.1:9']}
";

    #[test]
    fn unchanged() {
        let plan = plan_between(BASE, BASE);
        assert!(plan.remove.is_empty());
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
            plan.steps,
            [step("web", Action::Unchanged), step("db", Action::Update)]
        );
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
            plan.steps,
            [
                step("web", Action::Unchanged),
                step(
                    "cache",
                    Action::Add {
                        listener: Source::Bind
                    }
                )
            ]
        );
        assert_eq!(plan.remove, ["db"]);
        assert_eq!(plan.summary(), "added cache; removed db");
    }

    #[test]
    fn renamed_on_the_same_address_takes_the_socket_over() {
        let after = BASE.replace("name: db", "name: database");
        let plan = plan_between(BASE, &after);
        assert_eq!(
            plan.steps[1],
            step(
                "database",
                Action::Add {
                    listener: Source::TakeOver("db".into())
                }
            )
        );
        assert_eq!(plan.remove, ["db"]);
        assert_eq!(plan.taken_over().collect::<Vec<_>>(), ["db"]);
    }

    #[test]
    fn moved_address_binds_before_closing() {
        let after = BASE.replace("127.0.0.1:2", "127.0.0.1:4");
        let plan = plan_between(BASE, &after);
        assert_eq!(
            plan.steps[1],
            step(
                "db",
                Action::Move {
                    listener: Source::Bind
                }
            )
        );
        assert!(plan.remove.is_empty());
    }

    #[test]
    fn swapped_addresses_take_each_other_over() {
        let after = "
proxies:
  - {name: web, listen: '127.0.0.1:2', backends: ['127.0.0.1:9']}
  - {name: db, listen: '127.0.0.1:1', backends: ['127.0.0.1:9']}
";
        let plan = plan_between(BASE, after);
        assert_eq!(
            plan.steps,
            [
                step(
                    "web",
                    Action::Move {
                        listener: Source::TakeOver("db".into())
                    }
                ),
                step(
                    "db",
                    Action::Move {
                        listener: Source::TakeOver("web".into())
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_new_proxy_on_an_address_still_in_use_binds_and_fails_there() {
        // Validation forbids this within one config; the plan does not steal
        // a socket from a proxy that keeps it.
        let after = format!("{BASE}  - {{name: x, listen: '127.0.0.1:1', backends: ['127.0.0.1:9']}}\n");
        let plan = plan_between(BASE, &after);
        assert_eq!(
            plan.steps[2],
            step(
                "x",
                Action::Add {
                    listener: Source::Bind
                }
            )
        );
    }
}
