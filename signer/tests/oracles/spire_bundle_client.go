// SPIRE's own bundle endpoint client (github.com/spiffe/spire/pkg/server/bundle/client, the code behind
// `federates_with` in server.conf) fetching a bundle endpoint: the oracle for "SPIRE can read signet's endpoint".
//
// Usage: spire_bundle_client TRUST_DOMAIN URL [ENDPOINT_SPIFFE_ID ROOTS_PEM]
// Without the last two arguments the profile is https_web (system roots; SSL_CERT_FILE for a private CA), with
// them https_spiffe. Prints the bundle's key counts and refresh hint; exits 1 with SPIRE's error otherwise.
package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/spire/pkg/server/bundle/client"
)

func main() {
	td := spiffeid.RequireTrustDomainFromString(os.Args[1])
	cfg := client.ClientConfig{TrustDomain: td, EndpointURL: os.Args[2]}
	if len(os.Args) > 4 {
		id := spiffeid.RequireFromString(os.Args[3])
		data, err := os.ReadFile(os.Args[4])
		if err != nil {
			panic(err)
		}
		var roots []*x509.Certificate
		for {
			var b *pem.Block
			b, data = pem.Decode(data)
			if b == nil {
				break
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				panic(err)
			}
			roots = append(roots, c)
		}
		cfg.SPIFFEAuth = &client.SPIFFEAuthConfig{EndpointSpiffeID: id, RootCAs: roots}
	}
	c, err := client.NewClient(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	b, err := c.FetchBundle(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// SPIRE's decoder keeps the refresh hint and the keys; it sets the sequence itself (not read from the endpoint).
	hint, _ := b.RefreshHint()
	fmt.Printf("x509=%d jwt=%d refresh_hint=%s\n", len(b.X509Authorities()), len(b.JWTAuthorities()), hint)
}
