//! The vhost-user-blk backend: the protocol state of one frontend connection.
//!
//! The rust-vmm `vhost` crate reads and writes the messages; this module keeps what they set
//! (features, the memory table, each vring's configuration) and starts and stops queues on
//! their ring contexts. It runs on the main context. Every number from the frontend is checked
//! here against what was negotiated and mapped before it is used: queue indices against the
//! device's queue count, ring sizes against the virtio limits, addresses by the memory table.
//!
//! Queue `i` is served by ring `i % rings.len()` of the export: with several iothreads, queues
//! are spread round-robin.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ringblk_blkgraph::BackendHandle;
use ringblk_ring::{Group, Remote};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    BackendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserInflight, VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserShMemConfig, VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::config::BlkConfig;
use crate::memory::{MemoryTable, RegionDesc};
use crate::queue::{AddressSpace, QueueConfig, SplitQueue};
use crate::serve::{self, QueueStart};

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// The version bits of a vhost-user message header's flags.
pub(crate) const VHOST_USER_VERSION: u32 = 0x1;
const MAX_MEM_SLOTS: u64 = 32;
const QUEUE_SIZE_MAX: u32 = 32768;

/// Keys of running queues. A ring context keeps the queues it serves in one table for every
/// export and connection it serves, so keys must be unique in the process, not per connection.
static NEXT_QUEUE_KEY: AtomicU64 = AtomicU64::new(0);

/// What an export tells its backend about itself.
pub(crate) struct Device {
    pub export_id: String,
    /// The config space as the export started; [`Device::config`] adds the current capacity.
    pub initial_config: BlkConfig,
    /// The capacity now, in 512-byte sectors (it changes at `block_resize`).
    pub capacity_sectors: AtomicU64,
    pub handle: BackendHandle,
    pub group: Group,
    pub rings: Vec<Remote>,
    pub device_id: [u8; 20],
}

impl Device {
    /// The config space now.
    pub(crate) fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity_sectors: self.capacity_sectors.load(Ordering::Relaxed),
            ..self.initial_config.clone()
        }
    }
}

#[derive(Default)]
struct Vring {
    num: u32,
    /// Descriptor table, used ring, avail ring (frontend-virtual addresses).
    addr: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    /// Key of the running queue on its ring.
    running: Option<u64>,
}

/// The backend state of one connection.
pub(crate) struct BlkBackend {
    device: Arc<Device>,
    acked_features: u64,
    protocol_features: u64,
    memory: Option<Arc<MemoryTable>>,
    vrings: Vec<Vring>,
    /// The backend request channel (SET_BACKEND_REQ_FD), once the frontend gave one.
    backend_channel: Option<UnixStream>,
}

impl BlkBackend {
    pub(crate) fn new(device: Arc<Device>) -> BlkBackend {
        let queues = usize::from(device.initial_config.num_queues);
        BlkBackend {
            device,
            acked_features: 0,
            protocol_features: 0,
            memory: None,
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            backend_channel: None,
        }
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring> {
        let index = usize::try_from(index).map_err(|_| Error::InvalidParam)?;
        self.vrings.get_mut(index).ok_or(Error::InvalidParam)
    }

    fn ring_of(&self, index: usize) -> Remote {
        self.device.rings[index % self.device.rings.len()].clone()
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Starts queue `index` once it has everything it needs and is enabled.
    fn try_start(&mut self, index: usize) -> Result<()> {
        let negotiated = self.protocol_negotiated();
        let Some(memory) = self.memory.clone() else {
            return Ok(());
        };
        let vring = &self.vrings[index];
        let ready = vring.running.is_none()
            && vring.kick.is_some()
            && vring.addr.is_some()
            && vring.num > 0;
        // With VHOST_USER_F_PROTOCOL_FEATURES negotiated rings start disabled until
        // SET_VRING_ENABLE; without it they start enabled.
        if !ready || (negotiated && !vring.enabled) {
            return Ok(());
        }
        let (desc, used, avail) = vring.addr.expect("checked above");
        let config = QueueConfig {
            size: vring.num,
            desc_table: desc,
            avail_ring: avail,
            used_ring: used,
            addresses: AddressSpace::FrontendVirtual,
            event_idx: self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            indirect_desc: self.acked_features
                & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
                != 0,
        };
        let mut queue = SplitQueue::new(memory, config).map_err(|e| {
            eprintln!(
                "ringblk: {}: queue {index} refused: {e}",
                self.device.export_id
            );
            Error::InvalidParam
        })?;
        queue.set_next_avail(vring.base);
        let kick = vring
            .kick
            .as_ref()
            .expect("checked above")
            .try_clone()
            .map_err(Error::ReqHandlerError)?;
        let call = vring
            .call
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(Error::ReqHandlerError)?;
        let start = QueueStart {
            name: format!("export '{}' queue {index}", self.device.export_id),
            queue,
            limits: self.device.config().request_limits(),
            handle: self.device.handle.clone(),
            group: self.device.group,
            kick,
            call,
            device_id: self.device.device_id,
        };
        let key = NEXT_QUEUE_KEY.fetch_add(1, Ordering::Relaxed);
        self.ring_of(index).call(move || serve::start(key, start));
        self.vrings[index].running = Some(key);
        Ok(())
    }

    /// Stops queue `index` if it runs, waiting for its in-flight requests; records the next
    /// avail index as the ring's base.
    fn stop(&mut self, index: usize) {
        let Some(key) = self.vrings[index].running.take() else {
            return;
        };
        if let Some(Some(next_avail)) = self.ring_of(index).call(move || serve::stop(key)) {
            self.vrings[index].base = next_avail;
        }
    }

    /// Stops every queue (disconnect, RESET_OWNER).
    pub(crate) fn stop_all(&mut self) {
        for index in 0..self.vrings.len() {
            self.stop(index);
        }
    }

    /// Keeps the backend request channel the export took from SET_BACKEND_REQ_FD.
    pub(crate) fn set_backend_channel(&mut self, channel: UnixStream) {
        self.backend_channel = Some(channel);
    }

    /// The device's capacity changed: running queues check requests against the new one, then
    /// the frontend is told with VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (it re-reads the config
    /// space and interrupts the guest's driver). Without a backend channel the guest learns
    /// the capacity only when it next reads the config space.
    pub(crate) fn capacity_changed(&mut self) {
        let limits = self.device.config().request_limits();
        for index in 0..self.vrings.len() {
            if let Some(key) = self.vrings[index].running {
                self.ring_of(index)
                    .call(move || serve::set_limits(key, limits));
            }
        }
        let Some(channel) = &mut self.backend_channel else {
            return;
        };
        // Header only (the message has no payload), without NEED_REPLY: nothing to wait for.
        let request = u32::from(BackendReq::CONFIG_CHANGE_MSG);
        let flags = VHOST_USER_VERSION;
        let mut message = [0u8; 12];
        message[..4].copy_from_slice(&request.to_ne_bytes());
        message[4..8].copy_from_slice(&flags.to_ne_bytes());
        if let Err(e) = channel.write_all(&message) {
            eprintln!(
                "ringblk: {}: config change not sent to the frontend: {e}",
                self.device.export_id
            );
            self.backend_channel = None;
        }
    }

    fn set_memory(&mut self, table: MemoryTable) {
        let table = Arc::new(table);
        for index in 0..self.vrings.len() {
            if let Some(key) = self.vrings[index].running {
                let t = table.clone();
                self.ring_of(index).call(move || serve::set_memory(key, t));
            }
        }
        self.memory = Some(table);
        for index in 0..self.vrings.len() {
            let _ = self.try_start(index);
        }
    }
}

fn region_desc(r: &VhostUserMemoryRegion) -> RegionDesc {
    RegionDesc {
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        userspace_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

/// Makes a kick or call eventfd non-blocking. The frontend chose its flags, and on a blocking
/// eventfd a read racing the frontend's own, or a write at the counter's limit, would block
/// the ring context and every queue on it. The flag is shared with the frontend's copy of the
/// fd, which frontends create non-blocking anyway (QEMU's event notifiers are).
fn set_nonblocking(fd: Option<File>) -> Result<Option<File>> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    if let Some(file) = &fd {
        let flags =
            fcntl(file.as_fd(), FcntlArg::F_GETFL).map_err(|e| Error::ReqHandlerError(e.into()))?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(file.as_fd(), FcntlArg::F_SETFL(flags))
            .map_err(|e| Error::ReqHandlerError(e.into()))?;
    }
    Ok(fd)
}

fn refuse<T>(what: &'static str) -> Result<T> {
    Err(Error::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.stop_all();
        self.acked_features = 0;
        self.memory = None;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.reset_owner()
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.device.initial_config.device_features()
            | (1 << VIRTIO_F_VERSION_1)
            | VHOST_USER_F_PROTOCOL_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.get_features()? != 0 {
            return Err(Error::InvalidParam);
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if regions.len() != files.len() {
            return Err(Error::InvalidParam);
        }
        let pairs: Vec<_> = regions
            .iter()
            .zip(&files)
            .map(|(r, f)| (region_desc(r), f.as_fd()))
            .collect();
        let table = MemoryTable::new(&pairs).map_err(|e| {
            eprintln!(
                "ringblk: {}: memory table refused: {e}",
                self.device.export_id
            );
            Error::InvalidParam
        })?;
        self.set_memory(table);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        if num == 0 || num > QUEUE_SIZE_MAX || !num.is_power_of_two() {
            return Err(Error::InvalidParam);
        }
        self.vring(index)?.num = num;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        // The addresses are checked against the memory table when the queue starts.
        self.vring(index)?.addr = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.base = u16::try_from(base).map_err(|_| Error::InvalidParam)?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        self.stop(i);
        // The queue is stopped now; by the protocol it must be re-enabled before running again.
        self.vrings[i].enabled = false;
        self.vrings[i].kick = None;
        Ok(VhostUserVringState::new(
            index,
            u32::from(self.vrings[i].base),
        ))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        let fd = set_nonblocking(fd)?;
        self.stop(i);
        self.vrings[i].kick = fd;
        self.try_start(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        let fd = set_nonblocking(fd)?;
        if let Some(key) = self.vrings[i].running {
            let call = fd
                .as_ref()
                .map(File::try_clone)
                .transpose()
                .map_err(Error::ReqHandlerError)?;
            self.ring_of(i).call(move || serve::set_call(key, call));
        }
        self.vrings[i].call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index)).map(drop)
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        if features & !self.get_protocol_features()?.bits() != 0 {
            return Err(Error::InvalidParam);
        }
        self.protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(u64::from(self.device.initial_config.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let i = index as usize;
        self.vring(index)?.enabled = enable;
        if enable {
            self.try_start(i)
        } else {
            self.stop(i);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let len = usize::try_from(size).map_err(|_| Error::InvalidParam)?;
        if len > crate::config::CONFIG_LEN {
            return Err(Error::InvalidParam);
        }
        let mut out = vec![0; len];
        self.device
            .config()
            .read(offset, &mut out)
            .map_err(|_| Error::InvalidParam)?;
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        // The only writable field is `wce`, and ringblk always runs write-back with flushes.
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        refuse("not a GPU device")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        refuse("shared objects are not supported")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        refuse("INFLIGHT_SHMFD is not offered")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        refuse("INFLIGHT_SHMFD is not offered")
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        let current = self
            .memory
            .clone()
            .unwrap_or_else(|| Arc::new(MemoryTable::empty()));
        if current.regions().len() as u64 >= MAX_MEM_SLOTS {
            return Err(Error::InvalidParam);
        }
        let table = current
            .with_region_added(region_desc(region), fd.as_fd())
            .map_err(|e| {
                eprintln!(
                    "ringblk: {}: memory region refused: {e}",
                    self.device.export_id
                );
                Error::InvalidParam
            })?;
        self.set_memory(table);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let Some(current) = self.memory.clone() else {
            return Err(Error::InvalidParam);
        };
        let table = current
            .with_region_removed(&region_desc(region))
            .map_err(|_| Error::InvalidParam)?;
        self.set_memory(table);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        refuse("device state transfer is not supported")
    }

    fn check_device_state(&mut self) -> Result<()> {
        refuse("device state transfer is not supported")
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        refuse("no shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        refuse("dirty logging is not supported")
    }
}
