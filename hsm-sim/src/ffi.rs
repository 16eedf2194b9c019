//! The PKCS#11 v2.40 C ABI: `C_GetFunctionList` and the functions of its `CK_FUNCTION_LIST`. This is the only
//! module with `unsafe`: it checks and converts C arguments (null pointers give CKR_ARGUMENTS_BAD), calls the safe
//! [`Device`](crate::token::Device) it finds in the process's [`Registry`](crate::registry::Registry), and writes
//! results back with the two-call length convention. Every entry
//! point catches panics and answers CKR_GENERAL_ERROR instead of unwinding into C.
//!
//! Only `C_GetFunctionList` is exported by name; the list points at private functions, so another PKCS#11 module
//! loaded in the same process can never have its calls interposed by ours, or the reverse.
#![allow(unsafe_code)]
#![allow(non_snake_case, clippy::missing_safety_doc)]

use crate::config::Config;
use crate::crypto::{HashAlg, SignMechanism};
use crate::registry::{InitializeError, Registry};
use crate::rv::{CkResult, Rv};
use crate::token::{AttrValue, Device, SLOT_ID, SignOutput};
use cryptoki_sys::*;
use std::os::raw::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

/// The process's device and what outlives it (the module is loaded once per process).
static REGISTRY: Registry = Registry::new();

/// Gives the embedded device its configuration: `C_Initialize` uses it instead of reading `HSM_SIM_CONFIG` and
/// the `HSM_SIM_*` variables. For programs that link hsm-sim in (setting environment variables in a running,
/// multi-threaded program is unsound); call it before the module is first initialised. Returns false, and
/// keeps the first, when a configuration was set already.
pub fn set_embedded_config(config: Config) -> bool {
    REGISTRY.set_embedded_config(config)
}

const MANUFACTURER: &str = "signet hsm-sim";
const LIBRARY_DESCRIPTION: &str = "hsm-sim simulated network HSM";
const SLOT_DESCRIPTION: &str = "hsm-sim slot 0";
const MODEL: &str = "hsm-sim";

fn version() -> CK_VERSION {
    let major = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    CK_VERSION { major, minor }
}

/// Runs an entry point: panics become CKR_GENERAL_ERROR.
fn guard(f: impl FnOnce() -> CK_RV) -> CK_RV {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(CKR_GENERAL_ERROR)
}

fn device() -> Result<Arc<Device>, CK_RV> {
    REGISTRY.device().map_err(|Rv(v)| v)
}

/// Runs `f` with the initialised device.
fn with_device(f: impl FnOnce(&Device) -> Result<(), CK_RV>) -> CK_RV {
    guard(|| match device().and_then(|d| f(&d)) {
        Ok(()) => CKR_OK,
        Err(v) => v,
    })
}

fn ck(r: CkResult<()>) -> Result<(), CK_RV> {
    r.map_err(|Rv(v)| v)
}

fn check_slot(slot: CK_SLOT_ID) -> Result<(), CK_RV> {
    if slot == SLOT_ID {
        Ok(())
    } else {
        Err(CKR_SLOT_ID_INVALID)
    }
}

/// Copies `s` into a blank-padded fixed field.
fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Borrows a C buffer (null is allowed only when empty).
unsafe fn bytes<'a>(p: *const u8, len: CK_ULONG) -> Result<&'a [u8], CK_RV> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let len = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: the caller passed a buffer of `len` bytes at `p`, as the PKCS#11 contract requires.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Reads a C template into owned (type, value) pairs.
unsafe fn template(
    p: *const CK_ATTRIBUTE,
    n: CK_ULONG,
) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>, CK_RV> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let n = usize::try_from(n).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: `p` points at `n` attributes (PKCS#11 contract).
    let attrs = unsafe { std::slice::from_raw_parts(p, n) };
    attrs
        .iter()
        // SAFETY: each pValue points at ulValueLen bytes.
        .map(|a| {
            unsafe { bytes(a.pValue as *const u8, a.ulValueLen) }.map(|v| (a.type_, v.to_vec()))
        })
        .collect()
}

/// Writes `items` (bytes, handles, mechanism types) with the two-call convention: a null buffer gets the count,
/// a short one CKR_BUFFER_TOO_SMALL.
unsafe fn out_slice<T: Copy>(items: &[T], p: *mut T, count: *mut CK_ULONG) -> Result<(), CK_RV> {
    if count.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: `count` is non-null and points at a CK_ULONG; `p`, if non-null, holds `*count` entries (PKCS#11
    // contract).
    unsafe {
        let capacity = *count as usize;
        *count = items.len() as CK_ULONG;
        if p.is_null() {
            return Ok(());
        }
        if capacity < items.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        std::ptr::copy_nonoverlapping(items.as_ptr(), p, items.len());
    }
    Ok(())
}

unsafe fn out<T>(p: *mut T, value: T) -> Result<(), CK_RV> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null pointer to a T the caller owns.
    unsafe { p.write(value) };
    Ok(())
}

/// Reads a mechanism's parameters as `T`, if present and of the right size.
unsafe fn params<T: Copy>(m: &CK_MECHANISM) -> Option<T> {
    if m.pParameter.is_null() || m.ulParameterLen as usize != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: pParameter points at ulParameterLen bytes, which is the size of T.
    Some(unsafe { (m.pParameter as *const T).read_unaligned() })
}

unsafe fn sign_mechanism(p: *const CK_MECHANISM) -> Result<SignMechanism, CK_RV> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null pointer to the caller's CK_MECHANISM.
    let m = unsafe { &*p };
    let pss = |mech_hash: Option<HashAlg>| -> Result<(HashAlg, usize), CK_RV> {
        // SAFETY: `m` is a valid CK_MECHANISM.
        let prm: CK_RSA_PKCS_PSS_PARAMS =
            unsafe { params(m) }.ok_or(CKR_MECHANISM_PARAM_INVALID)?;
        let hash = HashAlg::from_ckm(prm.hashAlg).map_err(|Rv(v)| v)?;
        let mgf = HashAlg::from_mgf(prm.mgf).map_err(|Rv(v)| v)?;
        if mgf != hash || mech_hash.is_some_and(|h| h != hash) {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        Ok((hash, prm.sLen as usize))
    };
    Ok(match m.mechanism {
        CKM_ECDSA => SignMechanism::Ecdsa,
        CKM_ECDSA_SHA256 => SignMechanism::EcdsaHash(HashAlg::Sha256),
        CKM_ECDSA_SHA384 => SignMechanism::EcdsaHash(HashAlg::Sha384),
        CKM_ECDSA_SHA512 => SignMechanism::EcdsaHash(HashAlg::Sha512),
        CKM_EDDSA => {
            if !m.pParameter.is_null() {
                // SAFETY: `m` is a valid CK_MECHANISM.
                let prm: CK_EDDSA_PARAMS =
                    unsafe { params(m) }.ok_or(CKR_MECHANISM_PARAM_INVALID)?;
                if prm.phFlag != 0 || prm.ulContextDataLen != 0 {
                    // Ed25519ph and Ed25519ctx are not offered.
                    return Err(CKR_MECHANISM_PARAM_INVALID);
                }
            }
            SignMechanism::EdDsa
        }
        CKM_RSA_PKCS => SignMechanism::RsaPkcs,
        CKM_SHA256_RSA_PKCS => SignMechanism::RsaPkcsHash(HashAlg::Sha256),
        CKM_SHA384_RSA_PKCS => SignMechanism::RsaPkcsHash(HashAlg::Sha384),
        CKM_SHA512_RSA_PKCS => SignMechanism::RsaPkcsHash(HashAlg::Sha512),
        CKM_RSA_PKCS_PSS => {
            let (hash, salt_len) = pss(None)?;
            SignMechanism::RsaPss { hash, salt_len }
        }
        CKM_SHA256_RSA_PKCS_PSS | CKM_SHA384_RSA_PKCS_PSS | CKM_SHA512_RSA_PKCS_PSS => {
            let h = match m.mechanism {
                CKM_SHA256_RSA_PKCS_PSS => HashAlg::Sha256,
                CKM_SHA384_RSA_PKCS_PSS => HashAlg::Sha384,
                _ => HashAlg::Sha512,
            };
            let (hash, salt_len) = pss(Some(h))?;
            SignMechanism::RsaPssHash { hash, salt_len }
        }
        _ => return Err(CKR_MECHANISM_INVALID),
    })
}

// ----- general purpose -----

unsafe extern "C" fn initialize(args: *mut c_void) -> CK_RV {
    guard(|| {
        if !args.is_null() {
            // SAFETY: a non-null argument is a CK_C_INITIALIZE_ARGS.
            let a = unsafe { &*(args as *const CK_C_INITIALIZE_ARGS) };
            if !a.pReserved.is_null() {
                return CKR_ARGUMENTS_BAD;
            }
            let callbacks = [
                a.CreateMutex.is_some(),
                a.DestroyMutex.is_some(),
                a.LockMutex.is_some(),
                a.UnlockMutex.is_some(),
            ];
            let given = callbacks.iter().filter(|x| **x).count();
            if given != 0 && given != 4 {
                return CKR_ARGUMENTS_BAD;
            }
            // We lock with the OS primitives; an application that insists on its own mutexes cannot have us.
            if given == 4 && a.flags & CKF_OS_LOCKING_OK == 0 {
                return CKR_CANT_LOCK;
            }
        }
        match REGISTRY.initialize() {
            Ok(()) => CKR_OK,
            Err(e) => {
                if matches!(e, InitializeError::Device(_)) {
                    // The only channel a PKCS#11 module has to say why it cannot start.
                    eprintln!("hsm-sim: {e}");
                }
                e.rv().0
            }
        }
    })
}

unsafe extern "C" fn finalize(reserved: *mut c_void) -> CK_RV {
    guard(|| {
        if !reserved.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        match REGISTRY.finalize() {
            Ok(()) => CKR_OK,
            Err(Rv(v)) => v,
        }
    })
}

unsafe extern "C" fn get_info(info: *mut CK_INFO) -> CK_RV {
    with_device(|_| {
        let mut i = CK_INFO {
            cryptokiVersion: CK_VERSION {
                major: 2,
                minor: 40,
            },
            manufacturerID: [0; 32],
            flags: 0,
            libraryDescription: [0; 32],
            libraryVersion: version(),
        };
        pad(&mut i.manufacturerID, MANUFACTURER);
        pad(&mut i.libraryDescription, LIBRARY_DESCRIPTION);
        // SAFETY: caller's out-pointer.
        unsafe { out(info, i) }
    })
}

unsafe extern "C" fn get_slot_list(
    token_present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        let slots: Vec<CK_SLOT_ID> = if token_present != 0 && !d.token_present() {
            vec![]
        } else {
            vec![SLOT_ID]
        };
        // SAFETY: caller's out-pointers.
        unsafe { out_slice(&slots, list, count) }
    })
}

unsafe extern "C" fn get_slot_info(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        let mut i = CK_SLOT_INFO {
            slotDescription: [0; 64],
            manufacturerID: [0; 32],
            flags: CKF_REMOVABLE_DEVICE
                | CKF_HW_SLOT
                | if d.token_present() {
                    CKF_TOKEN_PRESENT
                } else {
                    0
                },
            hardwareVersion: version(),
            firmwareVersion: version(),
        };
        pad(&mut i.slotDescription, SLOT_DESCRIPTION);
        pad(&mut i.manufacturerID, MANUFACTURER);
        // SAFETY: caller's out-pointer.
        unsafe { out(info, i) }
    })
}

unsafe extern "C" fn get_token_info(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let t = d.token_info().map_err(|Rv(v)| v)?;
        let max = if t.max_sessions == 0 {
            CK_EFFECTIVELY_INFINITE
        } else {
            t.max_sessions as CK_ULONG
        };
        let mut i = CK_TOKEN_INFO {
            label: [0; 32],
            manufacturerID: [0; 32],
            model: [0; 16],
            serialNumber: [0; 16],
            flags: t.flags,
            ulMaxSessionCount: max,
            ulSessionCount: t.sessions as CK_ULONG,
            ulMaxRwSessionCount: max,
            ulRwSessionCount: t.rw_sessions as CK_ULONG,
            ulMaxPinLen: crate::token::MAX_PIN_LEN as CK_ULONG,
            ulMinPinLen: crate::token::MIN_PIN_LEN as CK_ULONG,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: version(),
            firmwareVersion: version(),
            utcTime: [b' '; 16],
        };
        pad(&mut i.label, &t.label);
        pad(&mut i.manufacturerID, MANUFACTURER);
        pad(&mut i.model, MODEL);
        pad(&mut i.serialNumber, &t.serial);
        // SAFETY: caller's out-pointer, checked non-null above.
        unsafe { out(info, i) }
    })
}

unsafe extern "C" fn get_mechanism_list(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        let mechs = d.mechanisms().map_err(|Rv(v)| v)?;
        // SAFETY: caller's out-pointers.
        unsafe { out_slice(&mechs, list, count) }
    })
}

unsafe extern "C" fn get_mechanism_info(
    slot: CK_SLOT_ID,
    m: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (min, max, flags) = d.mechanism_info(m).map_err(|Rv(v)| v)?;
        // SAFETY: caller's out-pointer.
        unsafe {
            out(
                info,
                CK_MECHANISM_INFO {
                    ulMinKeySize: min,
                    ulMaxKeySize: max,
                    flags,
                },
            )
        }
    })
}

unsafe extern "C" fn init_token(
    slot: CK_SLOT_ID,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    label: *mut CK_UTF8CHAR,
) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        if pin.is_null() || label.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the PIN is pin_len bytes; the label is a 32-byte blank-padded field.
        let (pin, label) = unsafe { (bytes(pin, pin_len)?, bytes(label, 32)?) };
        let label = String::from_utf8_lossy(label);
        ck(d.init_token(pin, &label))
    })
}

unsafe extern "C" fn init_pin(
    h: CK_SESSION_HANDLE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: pin_len bytes at pin.
        let pin = unsafe { bytes(pin, pin_len)? };
        ck(d.init_pin(h, pin))
    })
}

unsafe extern "C" fn set_pin(
    h: CK_SESSION_HANDLE,
    old: *mut CK_UTF8CHAR,
    old_len: CK_ULONG,
    new: *mut CK_UTF8CHAR,
    new_len: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: caller's buffers of the given lengths.
        let (old, new) = unsafe { (bytes(old, old_len)?, bytes(new, new_len)?) };
        ck(d.set_pin(h, old, new))
    })
}

// ----- sessions -----

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _app: *mut c_void,
    _notify: CK_NOTIFY,
    handle: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        if handle.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let h = d
            .open_session(flags & CKF_RW_SESSION != 0)
            .map_err(|Rv(v)| v)?;
        // SAFETY: checked non-null.
        unsafe { out(handle, h) }
    })
}

unsafe extern "C" fn close_session(h: CK_SESSION_HANDLE) -> CK_RV {
    with_device(|d| ck(d.close_session(h)))
}

unsafe extern "C" fn close_all_sessions(slot: CK_SLOT_ID) -> CK_RV {
    with_device(|d| {
        check_slot(slot)?;
        ck(d.close_all_sessions())
    })
}

unsafe extern "C" fn get_session_info(h: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) -> CK_RV {
    with_device(|d| {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let s = d.session_info(h).map_err(|Rv(v)| v)?;
        // SAFETY: checked non-null.
        unsafe {
            out(
                info,
                CK_SESSION_INFO {
                    slotID: SLOT_ID,
                    state: s.state,
                    flags: s.flags,
                    ulDeviceError: 0,
                },
            )
        }
    })
}

unsafe extern "C" fn login(
    h: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: pin_len bytes at pin.
        let pin = unsafe { bytes(pin, pin_len)? };
        ck(d.login(h, user, pin))
    })
}

unsafe extern "C" fn logout(h: CK_SESSION_HANDLE) -> CK_RV {
    with_device(|d| ck(d.logout(h)))
}

// ----- objects -----

unsafe extern "C" fn create_object(
    h: CK_SESSION_HANDLE,
    tpl: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    obj: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    with_device(|d| {
        if obj.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: `count` attributes at `tpl`.
        let tpl = unsafe { template(tpl, count)? };
        let handle = d.create_object(h, &tpl).map_err(|Rv(v)| v)?;
        // SAFETY: checked non-null.
        unsafe { out(obj, handle) }
    })
}

unsafe extern "C" fn destroy_object(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> CK_RV {
    with_device(|d| ck(d.destroy_object(h, obj)))
}

unsafe extern "C" fn get_attribute_value(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    tpl: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        if tpl.is_null() && count > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let n = usize::try_from(count).map_err(|_| CKR_ARGUMENTS_BAD)?;
        if n == 0 {
            return ck(d.get_attributes(h, obj, &[]).map(|_| ()));
        }
        // SAFETY: `count` attributes at `tpl`, writable by us.
        let attrs = unsafe { std::slice::from_raw_parts_mut(tpl, n) };
        let types: Vec<CK_ATTRIBUTE_TYPE> = attrs.iter().map(|a| a.type_).collect();
        let answers = d.get_attributes(h, obj, &types).map_err(|Rv(v)| v)?;
        let mut result = CKR_OK;
        for (a, answer) in attrs.iter_mut().zip(answers) {
            match answer {
                AttrValue::Value(v) => {
                    if a.pValue.is_null() {
                        a.ulValueLen = v.len() as CK_ULONG;
                    } else if (a.ulValueLen as usize) < v.len() {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        result = CKR_BUFFER_TOO_SMALL;
                    } else {
                        // SAFETY: pValue holds ulValueLen >= v.len() bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len())
                        };
                        a.ulValueLen = v.len() as CK_ULONG;
                    }
                }
                AttrValue::Sensitive => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    result = CKR_ATTRIBUTE_SENSITIVE;
                }
                AttrValue::Invalid => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    result = CKR_ATTRIBUTE_TYPE_INVALID;
                }
            }
        }
        if result == CKR_OK {
            Ok(())
        } else {
            Err(result)
        }
    })
}

unsafe extern "C" fn set_attribute_value(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    tpl: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: `count` attributes at `tpl`.
        let tpl = unsafe { template(tpl, count)? };
        ck(d.set_attributes(h, obj, &tpl))
    })
}

unsafe extern "C" fn find_objects_init(
    h: CK_SESSION_HANDLE,
    tpl: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: `count` attributes at `tpl`.
        let tpl = unsafe { template(tpl, count)? };
        ck(d.find_init(h, &tpl))
    })
}

unsafe extern "C" fn find_objects(
    h: CK_SESSION_HANDLE,
    objs: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        if count.is_null() || (objs.is_null() && max > 0) {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = d.find_next(h, max as usize).map_err(|Rv(v)| v)?;
        // SAFETY: `objs` holds `max` >= found.len() handles; `count` is non-null.
        unsafe {
            if !found.is_empty() {
                std::ptr::copy_nonoverlapping(found.as_ptr(), objs, found.len());
            }
            *count = found.len() as CK_ULONG;
        }
        Ok(())
    })
}

unsafe extern "C" fn find_objects_final(h: CK_SESSION_HANDLE) -> CK_RV {
    with_device(|d| ck(d.find_final(h)))
}

// ----- keys and signatures -----

unsafe extern "C" fn generate_key_pair(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    pub_tpl: *mut CK_ATTRIBUTE,
    pub_count: CK_ULONG,
    priv_tpl: *mut CK_ATTRIBUTE,
    priv_count: CK_ULONG,
    pub_key: *mut CK_OBJECT_HANDLE,
    priv_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    with_device(|d| {
        if mech.is_null() || pub_key.is_null() || priv_key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: non-null mechanism; templates of the given sizes.
        let (m, public, private) = unsafe {
            (
                (*mech).mechanism,
                template(pub_tpl, pub_count)?,
                template(priv_tpl, priv_count)?,
            )
        };
        let (p, k) = d
            .generate_key_pair(h, m, &public, &private)
            .map_err(|Rv(v)| v)?;
        // SAFETY: checked non-null.
        unsafe {
            out(pub_key, p)?;
            out(priv_key, k)
        }
    })
}

unsafe extern "C" fn sign_init(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: caller's mechanism (null checked inside).
        let m = unsafe { sign_mechanism(mech)? };
        ck(d.sign_init(h, m, key))
    })
}

unsafe fn write_signature(
    result: CkResult<SignOutput>,
    sig: *mut CK_BYTE,
    sig_len: *mut CK_ULONG,
) -> Result<(), CK_RV> {
    match result.map_err(|Rv(v)| v)? {
        // SAFETY: sig_len is non-null (checked by the callers).
        SignOutput::Length(n) => unsafe { out(sig_len, n as CK_ULONG) },
        SignOutput::TooSmall(n) => {
            // SAFETY: as above.
            unsafe { out(sig_len, n as CK_ULONG)? };
            Err(CKR_BUFFER_TOO_SMALL)
        }
        // SAFETY: the device checked that the caller's buffer (*sig_len bytes) is large enough.
        SignOutput::Signature(s) => unsafe { out_slice(&s, sig, sig_len) },
    }
}

unsafe extern "C" fn sign(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    sig: *mut CK_BYTE,
    sig_len: *mut CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        if sig_len.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's buffers.
        unsafe {
            let data = bytes(data, data_len)?;
            let capacity = (!sig.is_null()).then(|| *sig_len as usize);
            write_signature(d.sign(h, data, capacity), sig, sig_len)
        }
    })
}

unsafe extern "C" fn sign_update(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        // SAFETY: caller's buffer.
        let data = unsafe { bytes(data, data_len)? };
        ck(d.sign_update(h, data))
    })
}

unsafe extern "C" fn sign_final(
    h: CK_SESSION_HANDLE,
    sig: *mut CK_BYTE,
    sig_len: *mut CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        if sig_len.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: caller's buffers.
        unsafe {
            let capacity = (!sig.is_null()).then(|| *sig_len as usize);
            write_signature(d.sign_final(h, capacity), sig, sig_len)
        }
    })
}

unsafe extern "C" fn generate_random(
    h: CK_SESSION_HANDLE,
    buf: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    with_device(|d| {
        if buf.is_null() && len > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let n = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
        let out: &mut [u8] = if n == 0 {
            &mut []
        } else {
            // SAFETY: `buf` holds `len` writable bytes.
            unsafe { std::slice::from_raw_parts_mut(buf, n) }
        };
        ck(d.generate_random(h, out))
    })
}

unsafe extern "C" fn seed_random(h: CK_SESSION_HANDLE, seed: *mut CK_BYTE, len: CK_ULONG) -> CK_RV {
    with_device(|d| {
        // SAFETY: caller's buffer.
        let seed = unsafe { bytes(seed, len)? };
        ck(d.seed_random(h, seed))
    })
}

unsafe extern "C" fn get_function_status(_h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        if device().is_ok() {
            CKR_FUNCTION_NOT_PARALLEL
        } else {
            CKR_CRYPTOKI_NOT_INITIALIZED
        }
    })
}

unsafe extern "C" fn cancel_function(_h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        if device().is_ok() {
            CKR_FUNCTION_NOT_PARALLEL
        } else {
            CKR_CRYPTOKI_NOT_INITIALIZED
        }
    })
}

// ----- everything else: CKR_FUNCTION_NOT_SUPPORTED -----

macro_rules! not_supported {
    ($($name:ident($($t:ty),*);)*) => {
        $(
            unsafe extern "C" fn $name($(_: $t),*) -> CK_RV {
                guard(|| if device().is_ok() { CKR_FUNCTION_NOT_SUPPORTED } else { CKR_CRYPTOKI_NOT_INITIALIZED })
            }
        )*
    };
}

type H = CK_SESSION_HANDLE;
type B = *mut CK_BYTE;
type L = CK_ULONG;
type PL = *mut CK_ULONG;
type M = *mut CK_MECHANISM;
type O = CK_OBJECT_HANDLE;
type A = *mut CK_ATTRIBUTE;
type PO = *mut CK_OBJECT_HANDLE;

not_supported! {
    get_operation_state(H, B, PL);
    set_operation_state(H, B, L, O, O);
    copy_object(H, O, A, L, PO);
    get_object_size(H, O, PL);
    encrypt_init(H, M, O);
    encrypt(H, B, L, B, PL);
    encrypt_update(H, B, L, B, PL);
    encrypt_final(H, B, PL);
    decrypt_init(H, M, O);
    decrypt(H, B, L, B, PL);
    decrypt_update(H, B, L, B, PL);
    decrypt_final(H, B, PL);
    digest_init(H, M);
    digest(H, B, L, B, PL);
    digest_update(H, B, L);
    digest_key(H, O);
    digest_final(H, B, PL);
    sign_recover_init(H, M, O);
    sign_recover(H, B, L, B, PL);
    verify_init(H, M, O);
    verify(H, B, L, B, L);
    verify_update(H, B, L);
    verify_final(H, B, L);
    verify_recover_init(H, M, O);
    verify_recover(H, B, L, B, PL);
    digest_encrypt_update(H, B, L, B, PL);
    decrypt_digest_update(H, B, L, B, PL);
    sign_encrypt_update(H, B, L, B, PL);
    decrypt_verify_update(H, B, L, B, PL);
    generate_key(H, M, A, L, PO);
    wrap_key(H, M, O, O, B, PL);
    unwrap_key(H, M, O, B, L, A, L, PO);
    derive_key(H, M, O, A, L, PO);
    wait_for_slot_event(CK_FLAGS, *mut CK_SLOT_ID, *mut c_void);
}

/// The function list handed to applications. It lives for the life of the process.
static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(initialize),
    C_Finalize: Some(finalize),
    C_GetInfo: Some(get_info),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(get_slot_list),
    C_GetSlotInfo: Some(get_slot_info),
    C_GetTokenInfo: Some(get_token_info),
    C_GetMechanismList: Some(get_mechanism_list),
    C_GetMechanismInfo: Some(get_mechanism_info),
    C_InitToken: Some(init_token),
    C_InitPIN: Some(init_pin),
    C_SetPIN: Some(set_pin),
    C_OpenSession: Some(open_session),
    C_CloseSession: Some(close_session),
    C_CloseAllSessions: Some(close_all_sessions),
    C_GetSessionInfo: Some(get_session_info),
    C_GetOperationState: Some(get_operation_state),
    C_SetOperationState: Some(set_operation_state),
    C_Login: Some(login),
    C_Logout: Some(logout),
    C_CreateObject: Some(create_object),
    C_CopyObject: Some(copy_object),
    C_DestroyObject: Some(destroy_object),
    C_GetObjectSize: Some(get_object_size),
    C_GetAttributeValue: Some(get_attribute_value),
    C_SetAttributeValue: Some(set_attribute_value),
    C_FindObjectsInit: Some(find_objects_init),
    C_FindObjects: Some(find_objects),
    C_FindObjectsFinal: Some(find_objects_final),
    C_EncryptInit: Some(encrypt_init),
    C_Encrypt: Some(encrypt),
    C_EncryptUpdate: Some(encrypt_update),
    C_EncryptFinal: Some(encrypt_final),
    C_DecryptInit: Some(decrypt_init),
    C_Decrypt: Some(decrypt),
    C_DecryptUpdate: Some(decrypt_update),
    C_DecryptFinal: Some(decrypt_final),
    C_DigestInit: Some(digest_init),
    C_Digest: Some(digest),
    C_DigestUpdate: Some(digest_update),
    C_DigestKey: Some(digest_key),
    C_DigestFinal: Some(digest_final),
    C_SignInit: Some(sign_init),
    C_Sign: Some(sign),
    C_SignUpdate: Some(sign_update),
    C_SignFinal: Some(sign_final),
    C_SignRecoverInit: Some(sign_recover_init),
    C_SignRecover: Some(sign_recover),
    C_VerifyInit: Some(verify_init),
    C_Verify: Some(verify),
    C_VerifyUpdate: Some(verify_update),
    C_VerifyFinal: Some(verify_final),
    C_VerifyRecoverInit: Some(verify_recover_init),
    C_VerifyRecover: Some(verify_recover),
    C_DigestEncryptUpdate: Some(digest_encrypt_update),
    C_DecryptDigestUpdate: Some(decrypt_digest_update),
    C_SignEncryptUpdate: Some(sign_encrypt_update),
    C_DecryptVerifyUpdate: Some(decrypt_verify_update),
    C_GenerateKey: Some(generate_key),
    C_GenerateKeyPair: Some(generate_key_pair),
    C_WrapKey: Some(wrap_key),
    C_UnwrapKey: Some(unwrap_key),
    C_DeriveKey: Some(derive_key),
    C_SeedRandom: Some(seed_random),
    C_GenerateRandom: Some(generate_random),
    C_GetFunctionStatus: Some(get_function_status),
    C_CancelFunction: Some(cancel_function),
    C_WaitForSlotEvent: Some(wait_for_slot_event),
};

/// The PKCS#11 entry point: hands out the function list.
///
/// # Safety
/// `list` must be null or point at writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        if list.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // SAFETY: non-null out-pointer. The list is never written through: PKCS#11 types it `*mut` for history.
        unsafe { *list = &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST };
        CKR_OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_initialize_and_bad_initialize_arguments() {
        // This is the only test in the crate that touches the module-wide device; it never initialises it.
        let list = unsafe {
            let mut p: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
            assert_eq!(C_GetFunctionList(&mut p), CKR_OK);
            &*p
        };
        assert_eq!((list.version.major, list.version.minor), (2, 40));
        unsafe {
            let mut count: CK_ULONG = 0;
            assert_eq!(
                list.C_GetSlotList.unwrap()(1, std::ptr::null_mut(), &mut count),
                CKR_CRYPTOKI_NOT_INITIALIZED
            );
            assert_eq!(
                list.C_Finalize.unwrap()(std::ptr::null_mut()),
                CKR_CRYPTOKI_NOT_INITIALIZED
            );
            assert_eq!(
                list.C_Encrypt.unwrap()(
                    0,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut()
                ),
                CKR_CRYPTOKI_NOT_INITIALIZED
            );
            let mut reserved = 0u8;
            let mut args = CK_C_INITIALIZE_ARGS {
                CreateMutex: None,
                DestroyMutex: None,
                LockMutex: None,
                UnlockMutex: None,
                flags: CKF_OS_LOCKING_OK,
                pReserved: (&mut reserved as *mut u8).cast(),
            };
            let p = (&mut args as *mut CK_C_INITIALIZE_ARGS).cast();
            assert_eq!(
                list.C_Initialize.unwrap()(p),
                CKR_ARGUMENTS_BAD,
                "pReserved must be null"
            );
            args.pReserved = std::ptr::null_mut();
            unsafe extern "C" fn create(_: *mut *mut c_void) -> CK_RV {
                CKR_OK
            }
            args.CreateMutex = Some(create);
            let p = (&mut args as *mut CK_C_INITIALIZE_ARGS).cast();
            assert_eq!(
                list.C_Initialize.unwrap()(p),
                CKR_ARGUMENTS_BAD,
                "all four mutex callbacks or none"
            );
        }
    }

    #[test]
    fn two_call_convention_for_bytes() {
        let data = [1u8, 2, 3, 4];
        let mut len: CK_ULONG = 0;
        unsafe {
            assert_eq!(out_slice(&data, std::ptr::null_mut(), &mut len), Ok(()));
            assert_eq!(len, 4);
            let mut small = [0u8; 2];
            len = 2;
            assert_eq!(
                out_slice(&data, small.as_mut_ptr(), &mut len),
                Err(CKR_BUFFER_TOO_SMALL)
            );
            assert_eq!(len, 4);
            let mut buf = [0u8; 8];
            len = 8;
            assert_eq!(out_slice(&data, buf.as_mut_ptr(), &mut len), Ok(()));
            assert_eq!((len, &buf[..4]), (4, &data[..]));
            assert_eq!(
                out_slice(&data, buf.as_mut_ptr(), std::ptr::null_mut()),
                Err(CKR_ARGUMENTS_BAD)
            );
        }
    }

    #[test]
    fn null_pointers_are_bad_arguments_and_panics_are_caught() {
        unsafe {
            assert_eq!(C_GetFunctionList(std::ptr::null_mut()), CKR_ARGUMENTS_BAD);
            assert_eq!(bytes(std::ptr::null(), 3), Err(CKR_ARGUMENTS_BAD));
            assert_eq!(bytes(std::ptr::null(), 0), Ok(&[][..]));
        }
        assert_eq!(guard(|| panic!("boom")), CKR_GENERAL_ERROR);
    }
}
