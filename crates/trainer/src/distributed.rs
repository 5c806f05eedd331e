//! The processes of one training job. Built with the `mpi` feature and launched by `mpirun` or
//! Slurm's `srun`, each process is one rank of an MPI world; otherwise (or without a launcher)
//! the world is this process alone and every collective is the identity.
//!
//! Only the host-buffer collectives data parallelism needs are wrapped (sum all-reduce,
//! reduce-scatter, all-gather, broadcast, barrier, abort); they are MPI's own. Calls come from the
//! main thread only (MPI is initialised `Funneled`).

use std::sync::OnceLock;

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    rank: usize,
    size: usize,
    /// Rank among the processes of this node (picks the GPU of `cuda` / `vulkan`).
    local_rank: usize,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// Keeps MPI initialised; finalises it when dropped (at the end of `main`).
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Whether a process launcher started this process as one rank of several (OpenMPI, MPICH/PMI,
/// PMIx under Slurm).
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

/// Joins the job's world: call first thing in `main` and keep the returned session alive. Without
/// a launcher (or without the `mpi` feature) the world is this process alone.
pub fn init() -> anyhow::Result<Session> {
    #[cfg(feature = "mpi")]
    if launched_by_mpi() {
        use mpi::topology::Communicator;
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| anyhow::anyhow!("MPI was initialised twice"))?;
        let world = universe.world();
        let local = world.split_shared(world.rank());
        let me = World { rank: world.rank() as usize, size: world.size() as usize, local_rank: local.rank() as usize };
        WORLD.set(me).map_err(|_| anyhow::anyhow!("the process world was set twice"))?;
        return Ok(Session { _universe: Some(universe) });
    }
    #[cfg(not(feature = "mpi"))]
    if launched_by_mpi() && std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some_and(|n| n != "1") {
        anyhow::bail!("started by mpirun with several ranks, but this binary was built without the `mpi` feature (cargo build --features mpi)");
    }
    // `world()` is a lone process unless set above.
    Ok(Session {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// The world of this process (a single process unless [`init`] joined an MPI job).
pub fn world() -> World {
    *WORLD.get_or_init(World::single)
}

impl World {
    /// This process alone.
    pub fn single() -> Self {
        Self { rank: 0, size: 1, local_rank: 0 }
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Rank 0: the one that logs and writes the shared files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }
    /// Prints `line` once per job: rank 0 speaks for the others (the ranks run the same code,
    /// so every other rank would print the same).
    pub fn say(&self, line: impl std::fmt::Display) {
        if self.is_root() {
            println!("{line}");
        }
    }
    /// A warning once per job, on standard error.
    pub fn warn(&self, line: impl std::fmt::Display) {
        if self.is_root() {
            eprintln!("warning: {line}");
        }
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::collective::CommunicatorCollectives;
            mpi::topology::SimpleCommunicator::world().barrier();
        }
    }

    /// Element-wise sum over ranks, in place.
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = values.to_vec();
            mpi::topology::SimpleCommunicator::world().all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        let _ = values;
    }

    /// Sums `full` (the same length on every rank, a multiple of the world size) over ranks and
    /// returns this rank's block of the sum: elements `rank * n .. (rank + 1) * n`, n = len / size.
    pub fn reduce_scatter_sum(&self, full: &[f32]) -> Vec<f32> {
        assert_eq!(full.len() % self.size, 0, "reduce-scatter of {} values over {} ranks", full.len(), self.size);
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mut block = vec![0f32; full.len() / self.size];
            mpi::topology::SimpleCommunicator::world().reduce_scatter_block_into(full, &mut block[..], SystemOperation::sum());
            return block;
        }
        full.to_vec()
    }

    /// Every rank's `block` (all of one length), concatenated in rank order.
    pub fn all_gather(&self, block: &[f32]) -> Vec<f32> {
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::collective::CommunicatorCollectives;
            let mut full = vec![0f32; block.len() * self.size];
            mpi::topology::SimpleCommunicator::world().all_gather_into(block, &mut full[..]);
            return full;
        }
        block.to_vec()
    }

    /// Root's `values` on every rank.
    pub fn broadcast(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            mpi::topology::SimpleCommunicator::world().process_at_rank(0).broadcast_into(values);
        }
        let _ = values;
    }

    /// Every rank's `bytes` (each rank's of its own length), in rank order.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::collective::CommunicatorCollectives;
            use mpi::datatype::PartitionMut;
            let world = mpi::topology::SimpleCommunicator::world();
            let count = mpi::Count::try_from(bytes.len()).map_err(|_| anyhow::anyhow!("{} bytes to gather: more than MPI counts", bytes.len()))?;
            let mut counts = vec![0 as mpi::Count; self.size];
            world.all_gather_into(&count, &mut counts[..]);
            let displs: Vec<mpi::Count> = counts
                .iter()
                .scan(0 as mpi::Count, |at, &n| {
                    let start = *at;
                    *at = at.saturating_add(n);
                    Some(start)
                })
                .collect();
            let total: usize = counts.iter().map(|&n| n as usize).sum();
            if mpi::Count::try_from(total).is_err() {
                anyhow::bail!("{total} bytes gathered over {} ranks: more than MPI counts", self.size);
            }
            let mut all = vec![0u8; total];
            world.all_gather_varcount_into(bytes, &mut PartitionMut::new(&mut all[..], &counts[..], &displs[..]));
            return Ok(counts.iter().zip(&displs).map(|(&n, &at)| all[at as usize..(at + n) as usize].to_vec()).collect());
        }
        Ok(vec![bytes.to_vec()])
    }

    /// The indices of `n` items that this rank takes when they are dealt round-robin over the
    /// ranks: `rank, rank + size, ...`.
    pub fn dealt(&self, n: usize) -> impl Iterator<Item = usize> + use<> {
        (self.rank..n).step_by(self.size)
    }

    /// The results of `n` items dealt with [`Self::dealt`], gathered on every rank in item order:
    /// `mine` holds this rank's, in its order of `dealt(n)`. Every rank must call it.
    pub fn gather_dealt<T: serde::Serialize + serde::de::DeserializeOwned>(&self, n: usize, mine: Vec<T>) -> anyhow::Result<Vec<T>> {
        if !self.is_distributed() {
            return Ok(mine);
        }
        let bytes = rmp_serde::to_vec(&mine).map_err(|e| anyhow::anyhow!("encoding this rank's results for the other ranks: {e}"))?;
        let mut per_rank: Vec<std::vec::IntoIter<T>> = Vec::with_capacity(self.size);
        for (rank, bytes) in self.all_gather_bytes(&bytes)?.iter().enumerate() {
            let items: Vec<T> = rmp_serde::from_slice(bytes).map_err(|e| anyhow::anyhow!("decoding rank {rank}'s results: {e}"))?;
            let expected = (rank..n).step_by(self.size).count();
            if items.len() != expected {
                anyhow::bail!("rank {rank} sent {} results, its share of {n} is {expected}", items.len());
            }
            per_rank.push(items.into_iter());
        }
        Ok((0..n).map(|i| per_rank[i % self.size].next().expect("counted above")).collect())
    }

    /// Whether every rank says yes (for "all ranks succeeded" before publishing a file).
    pub fn all(&self, yes: bool) -> bool {
        let mut v = [if yes { 0.0 } else { 1.0 }];
        self.sum_f64(&mut v);
        v[0] == 0.0
    }

    /// `result` if every rank's succeeded; else this rank's own error, or, where this rank
    /// succeeded, an error saying `elsewhere` (every rank must call it).
    pub fn all_ok<T>(&self, result: anyhow::Result<T>, elsewhere: impl FnOnce() -> String) -> anyhow::Result<T> {
        if self.all(result.is_ok()) {
            return result;
        }
        result.and_then(|_| Err(anyhow::anyhow!(elsewhere())))
    }

    /// Ends the whole job with `code` (MPI_Abort: every rank, within the launcher's timeout), or
    /// this process when alone.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if self.is_distributed() {
            use mpi::topology::Communicator;
            mpi::topology::SimpleCommunicator::world().abort(code);
        }
        std::process::exit(code)
    }

    /// `error: ...` on stderr, prefixed by the rank in a job of several.
    pub fn report_error(&self, error: &anyhow::Error) {
        if self.is_distributed() {
            eprintln!("error (rank {} of {}): {error:#}", self.rank, self.size);
        } else {
            eprintln!("error: {error:#}");
        }
    }
}

/// [`crate::signals::received`] agreed across the job's ranks: every rank must call it at the same point; if
/// any rank was signalled, all get the signal's name (mpirun and Slurm signal every rank, but
/// not at the same instant).
pub fn signal_received_by_any_rank() -> Option<&'static str> {
    let world = world();
    let here = crate::signals::received();
    if !world.is_distributed() {
        return here;
    }
    let mut v = [if here.is_some() { 1.0 } else { 0.0 }];
    world.sum_f64(&mut v);
    (v[0] > 0.0).then(|| here.unwrap_or("SIGTERM"))
}

/// A training binary's `main`: joins the job's world (under `mpirun` / `srun`, built with the
/// `mpi` feature), runs `body`, and settles the exit status with [`exit_with`] while MPI is up.
pub fn main_with(body: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    let session = match init() {
        Ok(session) => session,
        Err(e) => return exit_with(Err(e)),
    };
    if let Err(e) = crate::signals::install() {
        return exit_with(Err(e.context("installing the SIGTERM/SIGINT handlers")));
    }
    let code = exit_with(body());
    drop(session);
    code
}

/// What a training binary's `main` does with its result: success, or the error reported (naming
/// the rank) and the whole job ended with a non-zero status. A rank that failed alone would leave
/// the others waiting in a collective forever: MPI_Abort ends them too.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    if let Some(stopped) = crate::signals::interrupted(&result) {
        // Every rank stopped at the same step and saved: a normal end.
        world().say(stopped);
        return std::process::ExitCode::SUCCESS;
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let w = world();
            w.report_error(&e);
            if w.is_distributed() {
                w.abort(1);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
