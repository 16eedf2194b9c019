//! C_GenerateRandom and C_SeedRandom.

use super::*;

impl Device {
    /// C_GenerateRandom.
    pub fn generate_random(&self, h: CK_SESSION_HANDLE, out: &mut [u8]) -> CkResult<()> {
        self.enter(Some(OpKind::Random))?;
        self.session(h)?;
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(out)
            .map_err(|_| Rv(CKR_DEVICE_ERROR))
    }

    /// C_SeedRandom: accepted and ignored (the token draws from the operating system's RNG, which needs no seed).
    pub fn seed_random(&self, h: CK_SESSION_HANDLE, _seed: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        self.session(h)?;
        Ok(())
    }
}
