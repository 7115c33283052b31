//! The load generator every push workload shares: concurrent clients making a bounded number
//! of pushes (and for a bounded time), timing each one.

use std::time::{Duration, Instant};

/// No workload runs longer than this, whatever its request count.
const WORKLOAD_DEADLINE: Duration = Duration::from_secs(60);

/// Latencies and throughput of one push workload.
pub(crate) struct PushFigures {
    pub mutations: usize,
    pub elapsed: Duration,
    pub latencies_ms: Vec<f64>,
}

impl PushFigures {
    pub(crate) fn mutations_per_second(&self) -> f64 {
        self.mutations as f64 / self.elapsed.as_secs_f64()
    }
}

/// One push for a workload to make: which client, to which of the workload's spaces, and the
/// id of its first mutation.
#[derive(Clone, Copy)]
pub(crate) struct PushJob {
    pub client: usize,
    pub space: usize,
    pub first_id: u64,
}

/// Runs `clients` concurrent clients; each makes its share of `total_pushes` pushes (of
/// `batch` mutations) one after another, in turn to each of `spaces` spaces, through `push`.
/// Bounded by WORKLOAD_DEADLINE as well.
pub(crate) async fn drive_clients<F, Fut>(
    clients: usize,
    spaces: usize,
    batch: usize,
    total_pushes: usize,
    push: F,
) -> anyhow::Result<PushFigures>
where
    F: Fn(PushJob) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let per_client = total_pushes.div_ceil(clients);
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            let push = push.clone();
            tokio::spawn(async move {
                let mut next_ids = vec![1u64; spaces];
                let mut latencies = Vec::with_capacity(per_client);
                for k in 0..per_client {
                    if started.elapsed() > WORKLOAD_DEADLINE {
                        break;
                    }
                    let space = (client + k) % spaces;
                    let job = PushJob {
                        client,
                        space,
                        first_id: next_ids[space],
                    };
                    next_ids[space] += batch as u64;
                    let sent = Instant::now();
                    push(job).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for worker in workers {
        latencies_ms.extend(worker.await??);
    }
    Ok(PushFigures {
        mutations: latencies_ms.len() * batch,
        elapsed: started.elapsed(),
        latencies_ms,
    })
}

/// The name of a workload's client: one per client and space, so each has its own group.
pub(crate) fn client_name(workload: &str, job: PushJob) -> String {
    format!("{workload}-c{}-s{}", job.client, job.space)
}

/// The name of a workload's space number `space`.
pub(crate) fn space_name(workload: &str, space: usize) -> String {
    format!("{workload}-{space}")
}

/// The client group of a workload's client (one client per group).
pub(crate) fn group_name(client: &str) -> String {
    format!("{client}-group")
}
