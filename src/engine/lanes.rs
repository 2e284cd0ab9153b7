//! Fair lanes: jobs waiting for a place, one FIFO lane per API key, taken by weighted
//! round-robin (a key of priority p takes p + 1 turns per round), so one key's backlog cannot
//! starve another key's job.
//!
//! Pure scheduling logic, generic over the job: an engine keeps its own job type here and only
//! has to say which [`Lane`] each job is in.

use std::collections::VecDeque;

use super::Lane;

/// A job that belongs to a fairness lane.
pub trait Laned {
    /// The job's lane (its API key and weight).
    fn lane(&self) -> Lane;
}

/// Jobs waiting for a place: one FIFO lane per key, taken by weighted round-robin (a lane of
/// weight w takes up to w jobs in a row before the next lane's turn).
#[derive(Debug)]
pub struct Lanes<J> {
    lanes: VecDeque<LaneQueue<J>>,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Self {
            lanes: VecDeque::new(),
        }
    }
}

#[derive(Debug)]
struct LaneQueue<J> {
    key: i64,
    weight: u32,
    /// Turns left in this lane's current round.
    turns: u32,
    jobs: VecDeque<J>,
}

impl<J: Laned> LaneQueue<J> {
    fn new(job: J) -> Self {
        let lane = job.lane();
        Self {
            key: lane.key,
            weight: lane.weight.max(1),
            turns: lane.weight.max(1),
            jobs: VecDeque::from([job]),
        }
    }
}

impl<J: Laned> Lanes<J> {
    /// Queues a job at the back of its key's lane (a new lane goes to the back of the line).
    pub fn push(&mut self, job: J) {
        let lane = job.lane();
        match self.lanes.iter_mut().find(|l| l.key == lane.key) {
            Some(queue) => {
                // The key's latest priority applies from its next round.
                queue.weight = lane.weight.max(1);
                queue.jobs.push_back(job);
            }
            None => self.lanes.push_back(LaneQueue::new(job)),
        }
    }

    /// Puts a job that was already chosen back at the head of the line.
    pub fn push_first(&mut self, job: J) {
        let key = job.lane().key;
        match self.lanes.iter().position(|l| l.key == key) {
            Some(i) => {
                if let Some(mut queue) = self.lanes.remove(i) {
                    queue.jobs.push_front(job);
                    self.lanes.push_front(queue);
                }
            }
            None => self.lanes.push_front(LaneQueue::new(job)),
        }
    }

    /// Whether no job waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Whether the job at the head of some lane satisfies `pred`.
    pub fn any_head(&self, pred: impl Fn(&J) -> bool) -> bool {
        self.lanes.iter().any(|l| l.jobs.front().is_some_and(&pred))
    }

    /// The head job of the lane whose turn it is and that `fits`. A lane keeps the turn until
    /// it has taken `weight` jobs (or cannot take one now), then goes to the back.
    pub fn take_next(&mut self, fits: impl Fn(&J) -> bool) -> Option<J> {
        for _ in 0..self.lanes.len() {
            let mut queue = self.lanes.pop_front()?;
            if queue.jobs.front().is_some_and(&fits) {
                let job = queue.jobs.pop_front();
                queue.turns = queue.turns.saturating_sub(1);
                if !queue.jobs.is_empty() {
                    if queue.turns == 0 {
                        queue.turns = queue.weight;
                        self.lanes.push_back(queue);
                    } else {
                        self.lanes.push_front(queue);
                    }
                }
                return job;
            }
            queue.turns = queue.weight;
            self.lanes.push_back(queue);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiting job; only its lane matters here.
    struct Job {
        lane: Lane,
    }

    impl Laned for Job {
        fn lane(&self) -> Lane {
            self.lane
        }
    }

    fn job(key: i64, priority: i32) -> Job {
        Job {
            lane: Lane::new(key, priority),
        }
    }

    fn order(lanes: &mut Lanes<Job>) -> Vec<i64> {
        std::iter::from_fn(|| lanes.take_next(|_| true))
            .map(|j| j.lane.key)
            .collect()
    }

    #[test]
    fn a_backlog_takes_turns_with_a_late_single_job() {
        let mut lanes = Lanes::default();
        for _ in 0..5 {
            lanes.push(job(1, 0));
        }
        lanes.push(job(2, 0));
        assert_eq!(order(&mut lanes), vec![1, 2, 1, 1, 1, 1]);
    }

    #[test]
    fn priority_buys_turns_in_proportion_and_starves_nobody() {
        let mut lanes = Lanes::default();
        for _ in 0..4 {
            lanes.push(job(1, 0));
        }
        for _ in 0..8 {
            lanes.push(job(2, 2));
        }
        // Key 2 (priority 2) takes three jobs for each of key 1's.
        assert_eq!(order(&mut lanes), vec![1, 2, 2, 2, 1, 2, 2, 2, 1, 2, 2, 1]);
    }

    #[test]
    fn a_lane_whose_head_does_not_fit_keeps_its_place_in_line() {
        let mut lanes = Lanes::default();
        lanes.push(job(1, 0));
        lanes.push(job(2, 0));
        let second = lanes.take_next(|j| j.lane.key == 2).map(|j| j.lane.key);
        assert_eq!(second, Some(2));
        assert_eq!(order(&mut lanes), vec![1]);
    }
}
