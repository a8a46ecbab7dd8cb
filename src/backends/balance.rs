//! Choosing a backend: the strategies of `balance`, as plain functions over
//! a slice of candidates, so each is tested on its own.
//!
//! Everything here is lock-free: round robin walks a schedule computed once
//! per backend set with an atomic cursor; random and p2c draw from a
//! per-thread generator.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The longest round-robin schedule built: its memory and the time to
/// build it stay bounded whatever the weights (they are 1 to 1000 from the
/// config and the state file, but the schedule does not rely on that).
pub const MAX_SCHEDULE: usize = 1 << 16;

/// A smooth weighted round-robin order (nginx's algorithm, run ahead of
/// time): weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
/// Weights are first divided by their common divisor; if they still sum
/// past `MAX_SCHEDULE` they are scaled down to fit (each at least 1), so
/// the shares are then approximate.
pub fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let weights = fit(weights);
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best);
    }
    schedule
}

/// `weights` reduced by their greatest common divisor and, when their sum
/// is still above `MAX_SCHEDULE`, scaled to about that sum.
fn fit(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().fold(0u32, |a, &b| gcd(a, b)).max(1);
    let reduced: Vec<u32> = weights.iter().map(|&w| w / divisor).collect();
    let total: u64 = reduced.iter().map(|&w| u64::from(w)).sum();
    let budget = (MAX_SCHEDULE as u64).max(weights.len() as u64);
    if total <= budget {
        return reduced;
    }
    reduced
        .iter()
        .map(|&w| ((u64::from(w) * budget / total) as u32).max(1))
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Round robin: the next scheduled index for which `usable` holds. Each
/// skipped entry advances the shared cursor too, so a down backend's turns
/// are spread over the others instead of all going to its successor.
pub fn round_robin(
    schedule: &[usize],
    cursor: &AtomicUsize,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..schedule.len())
        .map(|_| schedule[cursor.fetch_add(1, Relaxed) % schedule.len()])
        .find(|&index| usable(index))
}

/// Weighted random among the `usable` indexes.
pub fn random(weights: &[u32], usable: impl Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = (0..weights.len())
        .filter(|&i| usable(i))
        .map(|i| u64::from(weights[i]))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = next_random() % total;
    for (index, &weight) in weights.iter().enumerate() {
        if !usable(index) {
            continue;
        }
        if ticket < u64::from(weight) {
            return Some(index);
        }
        ticket -= u64::from(weight);
    }
    None
}

/// Power of two choices: two usable indexes at random, the one with fewer
/// active connections per unit of weight wins.
pub fn p2c(weights: &[u32], load: impl Fn(usize) -> u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..weights.len()).filter(|&i| usable(i)).count() as u64;
    let nth = |n: u64| (0..weights.len()).filter(|&i| usable(i)).nth(n as usize);
    match count {
        0 => None,
        1 => nth(0),
        _ => {
            let first = next_random() % count;
            let second = (first + 1 + next_random() % (count - 1)) % count;
            let (a, b) = (nth(first)?, nth(second)?);
            // Compare load/weight without division: la * wb vs lb * wa.
            let cost = |x: usize, y: usize| u128::from(load(x)) * u128::from(weights[y].max(1));
            Some(if cost(a, b) <= cost(b, a) { a } else { b })
        }
    }
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// xorshift64*: plenty for spreading load, and no lock or syscall per pick.
fn next_random() -> u64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_usize(&hasher as *const _ as usize);
    hasher.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_smooth_and_weighted() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(smooth_schedule(&[2, 1]).iter().filter(|&&i| i == 0).count(), 2);
    }

    #[test]
    fn schedules_stay_bounded_whatever_the_weights() {
        assert_eq!(smooth_schedule(&[1000, 1000]), [0, 1]);
        assert_eq!(smooth_schedule(&[10, 5, 5]), [0, 1, 2, 0]);
        let huge = smooth_schedule(&[u32::MAX, u32::MAX - 1, 1]);
        assert!(huge.len() <= MAX_SCHEDULE + 3, "{}", huge.len());
        assert!(huge.contains(&2), "every backend keeps a turn");
        let share = huge.iter().filter(|&&i| i == 0).count() as f64 / huge.len() as f64;
        assert!((0.49..0.51).contains(&share), "{share}");
    }

    #[test]
    fn round_robin_is_even_and_skips_unusable() {
        let schedule = smooth_schedule(&[1, 1, 1]);
        let cursor = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..6)
            .map(|_| round_robin(&schedule, &cursor, |_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let picks: Vec<usize> = (0..6)
            .map(|_| round_robin(&schedule, &cursor, |i| i != 1).unwrap())
            .collect();
        assert_eq!(
            picks.iter().filter(|&&i| i == 0).count(),
            3,
            "{picks:?}: even around the down one"
        );
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 3, "{picks:?}");
        assert_eq!(round_robin(&schedule, &cursor, |_| false), None);
    }

    #[test]
    fn random_follows_weights() {
        let mut counts = [0u32; 2];
        for _ in 0..40_000 {
            counts[random(&[3, 1], |_| true).unwrap()] += 1;
        }
        let share = f64::from(counts[0]) / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{share}");
        assert_eq!(random(&[3, 1], |i| i == 1), Some(1));
    }

    #[test]
    fn p2c_avoids_the_loaded_backend() {
        let load = |i: usize| if i == 0 { 100 } else { 1 };
        let mut to_loaded = 0;
        for _ in 0..1000 {
            if p2c(&[1, 1, 1], load, |_| true) == Some(0) {
                to_loaded += 1;
            }
        }
        assert_eq!(to_loaded, 0, "a loaded backend loses every comparison");
        assert_eq!(p2c(&[1, 1], load, |i| i == 0), Some(0));
        assert_eq!(p2c(&[1], load, |_| false), None);
    }
}
